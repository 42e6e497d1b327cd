"""Workaround for keras-team/keras#20585: `fit` under MultiWorkerMirroredStrategy.

Keras 3.15's TensorFlow trainer fails twice before the first step when the
strategy runs in multi-worker mode (checked with Keras 3.15.1, TF 2.21):

1. `_maybe_symbolic_build` reduces the first distributed batch with
   `strategy.reduce("MEAN", batch)`, which the collective strategy refuses
   ("Attempt to convert a value (PerReplica ...) to a Tensor").
2. `reduce_per_replica(..., "auto")` reduces every logged metric with
   `strategy.reduce("MEAN", value, axis=0)`, and a scalar has no axis 0
   ("Invalid reduction dimension 0 for input with 0 dimensions").

`apply(model)` fixes both on one model instance (no global patching): the
symbolic build uses this worker's first local batch (only shapes and dtypes
matter there), and the step functions return each scalar log as a
shape-`(1,)` tensor, which the collective mean reduces back to a scalar.
`prepare_fit` then puts `_spec_build` in front of that build, so the batch
is read only for data without a plain `element_spec` (reading it costs a
seeded shuffle one permutation, see `_spec_build.py`).

`tests/test_multiworker.py::test_keras_still_needs_the_multiworker_fix`
runs `fit` without it and expects failure 1; when that test fails, Keras has
fixed the bug: delete this module and its call in `distribute.py`.
"""

import tensorflow as tf

# The only private Keras name used: the condition under which Keras' own
# `reduce_per_replica` takes the collective path that fails on scalars.
from keras.src.backend.tensorflow.trainer import (  # noqa: E402
    _collective_all_reduce_multi_worker,
)

APPLIED = "_keras_reformer_multiworker_fix"


def needed(strategy):
    """True if `strategy` takes the failing multi-worker path of Keras' `fit`."""
    return bool(_collective_all_reduce_multi_worker(strategy))


def _first_local_batch(iterator):
    for _, _, it in iterator:
        batch = next(it)
        break
    strategy = tf.distribute.get_strategy()

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def _scalars_as_vectors(step):
    def wrapped(data):
        logs = step(data)
        return tf.nest.map_structure(
            lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, logs
        )

    return wrapped


def apply(model):
    """Lets `model.fit`/`evaluate` run under a multi-worker strategy. Idempotent."""
    if getattr(model, APPLIED, False):
        return model
    original_build = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            with model.distribute_strategy.scope():
                data_batch = _first_local_batch(iterator)
        return original_build(data_batch=data_batch)

    # Instance attributes shadow the class's methods for this model only;
    # object.__setattr__ keeps Keras' attribute tracking out of it.
    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)
    object.__setattr__(model, "train_step", _scalars_as_vectors(model.train_step))
    object.__setattr__(model, "test_step", _scalars_as_vectors(model.test_step))
    object.__setattr__(model, APPLIED, True)
    model.train_function = model.test_function = None
    return model
