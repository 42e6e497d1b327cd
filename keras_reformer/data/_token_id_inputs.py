"""Token-id checks that run before the compiled step of `fit`/`evaluate`/`predict`.

`TokenIdCheck` inside the model cannot fail under XLA (`jit_compile=True`,
Keras' default on GPU/TPU): XLA drops assertions and clamps gather indices,
so a bad id would silently train on a wrong embedding row. Keras compiles
the whole step, data included, so the check has to come before it: arrays
are checked once, up front (a `ValueError` before any step), and datasets,
generators and `PyDataset`s batch by batch as they are read (in tf.data for
datasets, off the step's critical path).

Why not a check in the step: with `jit_compile=True` Keras compiles its
whole per-batch step (all that follows the iterator's `get_next()`) as one
XLA program. A check around the compiled part would mean compiling the step
ourselves and hiding `jit_compile=True` from Keras while it builds its step
functions, i.e. depending on when Keras reads `jit_compile` and
`train_step` (private behaviour). The data route uses only the public
arguments of `fit` & co, and costs the step nothing (the check runs in
tf.data's threads). `distribute.prepare_fit` owns its step and checks in
it (`check_step_inputs`) where that step is a plain graph around per-replica
XLA (MirroredStrategy, MultiWorkerMirroredStrategy): that also covers
models that merely contain a `ReformerModel`.
"""

import inspect

import keras
import tensorflow as tf

from keras_reformer._token_ids import assert_token_ids_in_sync
from keras_reformer.data._batch_shape import relax_batch_size
from keras_reformer.data._elements import map_elements
from keras_reformer.data.token_ids import check_element, token_id_path
from keras_reformer.layers.token_id_check import TokenIdCheck

_FIT_SIGNATURE = inspect.signature(keras.Model.fit)

# Set on a model by `distribute.prepare_fit` when its training step checks the
# ids (mirrored strategies). `fit` then leaves the training data unwrapped:
# under several local devices a tf.data error can reach Keras as the
# OutOfRangeError of another device's iterator (whichever fails first),
# which `fit` takes for the end of the data and stops without an error.
STEP_CHECKS_IDS = "_keras_reformer_step_checks_ids"


def _checked_generator(generator, vocabulary_size):
    for batch in generator:
        yield check_element(batch, vocabulary_size)


class _CheckedPyDataset(keras.utils.PyDataset):
    """A `PyDataset` whose batches are checked as they are read."""

    def __init__(self, inner, vocabulary_size):
        super().__init__(workers=inner.workers,
                         use_multiprocessing=inner.use_multiprocessing,
                         max_queue_size=inner.max_queue_size)
        self.inner, self.vocabulary_size = inner, vocabulary_size

    def __len__(self):
        return len(self.inner)

    @property
    def num_batches(self):
        return self.inner.num_batches

    def __getitem__(self, index):
        return check_element(self.inner[index], self.vocabulary_size)

    def on_epoch_begin(self):
        self.inner.on_epoch_begin()

    def on_epoch_end(self):
        self.inner.on_epoch_end()


def checked_data(x, vocabulary_size):
    """`x` as `fit` takes it, with its token ids checked (see module doc).

    Arrays (a dict with `"token_ids"`) raise a `ValueError` now; datasets,
    generators and `PyDataset`s are wrapped to check each batch. Anything
    else (e.g. a `tf.distribute.DistributedDataset`) is returned as is.
    """
    if isinstance(x, tf.data.Dataset):
        if token_id_path(x.element_spec) is None:
            return x
        return map_elements(x, lambda element: check_element(element, vocabulary_size))
    if inspect.isgenerator(x):
        return _checked_generator(x, vocabulary_size)
    if isinstance(x, keras.utils.PyDataset):
        return _CheckedPyDataset(x, vocabulary_size)
    if isinstance(x, dict):
        check_element(x, vocabulary_size)
    return x


class TokenIdInputs:
    """Mixin for `keras.Model`s taking `{"token_ids", ...}`: checks the ids of
    every input given to `fit`, `evaluate`, `predict` and `*_on_batch`
    before Keras' (possibly XLA-compiled) step sees them.

    The model must have `vocabulary_size`, or a `backbone` that has it.
    """

    def _token_id_vocabulary_size(self):
        return getattr(self, "backbone", self).vocabulary_size

    def _checked(self, x):
        return checked_data(x, self._token_id_vocabulary_size())

    def fit(self, x=None, y=None, *args, **kwargs):
        bound = _FIT_SIGNATURE.bind(self, x, y, *args, **kwargs)
        arguments = bound.arguments
        x = arguments.get("x")
        if not getattr(self, STEP_CHECKS_IDS, False) or isinstance(x, dict):
            arguments["x"] = self._checked(x)  # arrays: a ValueError up front
        validation = arguments.get("validation_data")
        if isinstance(validation, (tuple, list)) and validation:
            self._checked(validation[0])
        elif validation is not None:
            arguments["validation_data"] = self._evaluation_data(validation)
        # By keyword: a base class (keras-hub's tasks) may order `fit`'s
        # parameters otherwise than `keras.Model.fit`.
        arguments = dict(arguments)
        del arguments["self"]
        arguments.update(arguments.pop("kwargs", {}))
        return super().fit(**arguments)

    def _evaluation_data(self, x):
        x = self._checked(x)
        # Keras 3.15 graph mode miscounts the steps of a finite dataset with
        # a static batch size (keras_reformer/data/_batch_shape.py).
        return relax_batch_size(x) if isinstance(x, tf.data.Dataset) else x

    def evaluate(self, x=None, *args, **kwargs):
        return super().evaluate(self._evaluation_data(x), *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        return super().predict(self._checked(x), *args, **kwargs)

    def train_on_batch(self, x, *args, **kwargs):
        return super().train_on_batch(self._checked(x), *args, **kwargs)

    def test_on_batch(self, x, *args, **kwargs):
        return super().test_on_batch(self._checked(x), *args, **kwargs)

    def predict_on_batch(self, x):
        return super().predict_on_batch(self._checked(x))


def _token_id_checks(layer):
    """The `TokenIdCheck` layers of `layer` and of the models nested in it."""
    found = [layer] if isinstance(layer, TokenIdCheck) else []
    for sublayer in getattr(layer, "layers", ()):
        found += _token_id_checks(sublayer)
    return found


def step_vocabulary_size(model):
    """The smallest `vocabulary_size` of the `TokenIdCheck`s in `model`, or
    `None` if it has none: what a training step checks the ids against."""
    sizes = [check.vocabulary_size for check in _token_id_checks(model)]
    return min(sizes) if sizes else None


def check_step_inputs(vocabulary_size, x):
    """`x` (a step's inputs) with its token ids behind an assertion.

    For a step whose model runs in an XLA-compiled function called from a
    plain graph (`prepare_fit`'s per-replica step): the assertion runs in
    the graph, before the compiled part, which must take the returned `x`.
    With several replicas, all of them fail when one holds a bad id
    (`keras_reformer._token_ids.assert_token_ids_in_sync`). A no-op when `vocabulary_size` is `None` and
    inside XLA, where it could not run.
    """
    if vocabulary_size is None:
        return x
    # As a 1-tuple: `x` itself may be a list of several inputs, not (x, y).
    return check_element((x,), vocabulary_size, assert_fn=assert_token_ids_in_sync)[0]
