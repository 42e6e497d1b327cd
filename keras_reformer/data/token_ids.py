"""Token-id checks in the input pipeline, where assertions still run.

Under XLA (`jit_compile=True`, Keras' default on GPU/TPU) a compiled step
drops assertions and clamps out-of-range gather indices, so an id outside
the vocabulary would silently train on a wrong embedding row. A check in
tf.data runs on the host, before the batch reaches the compiled step, and
overlaps with training (prefetch), so it costs the step nothing.
"""

import tensorflow as tf

from keras_reformer import _checks, _token_ids
from keras_reformer.data._elements import map_elements


def _inputs_of(element):
    """Keras' reading of a batch: `(x, y, sample_weight)`, `(x, y)`, `(x,)` or `x`."""
    return element[0] if isinstance(element, (tuple, list)) and element else element


def token_id_path(element, key="token_ids"):
    """Where the token ids of a batch are: `(index, key)` steps into the
    element, or `None` when it holds none that can be told apart.

    The inputs (see `_inputs_of`) hold them as `inputs[key]` when a dict,
    or are them when a single integer tensor or array.
    """
    path = (0,) if isinstance(element, (tuple, list)) and element else ()
    inputs = _inputs_of(element)
    if isinstance(inputs, dict):
        return path + (key,) if key in inputs else None
    dtype = getattr(inputs, "dtype", None)
    if dtype is not None and tf.as_dtype(dtype).is_integer:
        return path
    return None


def _replace(element, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(element, dict):
        return {**element, head: _replace(element[head], rest, value)}
    items = list(element)
    items[head] = _replace(items[head], rest, value)
    return type(element)(items)


def _get(element, path):
    for step in path:
        element = element[step]
    return element


def check_element(element, vocabulary_size, key="token_ids",
                  assert_fn=_token_ids.assert_token_ids):
    """A batch with its token ids behind an assertion (symbolic tensors:
    tf.data, `tf.function`; `assert_fn(ids, vocabulary_size, name)` makes
    it) or checked at once (arrays and eager tensors: a `ValueError`)."""
    path = token_id_path(element, key)
    if path is None:
        return element
    ids = _get(element, path)
    name = key if key in path else "token_ids"
    if isinstance(ids, tf.Tensor) and not tf.executing_eagerly():
        return _replace(element, path, assert_fn(ids, vocabulary_size, name))
    # Arrays and eager tensors: checked now, a ValueError.
    _token_ids.check_token_ids_numpy(ids, vocabulary_size, name)
    return element


def check_token_ids(dataset, vocabulary_size, key="token_ids"):
    """`dataset` with every batch's token ids checked against the vocabulary.

    Use it for data that goes to a model of your own that contains a
    `ReformerBackbone` and is compiled with XLA (`ReformerBackbone` and
    `ReformerCausalLM` wrap the data given to their own `fit`, `evaluate`
    and `predict` with it already).

    Args:
        dataset: a `tf.data.Dataset` of `x`, `(x,)`, `(x, y)` or
            `(x, y, sample_weight)` elements, where `x` is the token ids
            (an integer tensor) or a dict holding them under `key`.
        vocabulary_size: int. Ids must be in `[0, vocabulary_size)`.
        key: str. The dict key of the token ids. Defaults to `"token_ids"`.

    Returns:
        A dataset with the same elements; iterating over a batch with an id
        outside `[0, vocabulary_size)` raises `InvalidArgumentError` naming
        the id, its position and `vocabulary_size`.

    Example:

    >>> import tensorflow as tf
    >>> from keras_reformer.data import check_token_ids
    >>> ds = tf.data.Dataset.from_tensor_slices(([[1, 2], [3, 300]], [0, 1]))
    >>> ds = check_token_ids(ds.batch(2), vocabulary_size=256)
    >>> next(iter(ds))  # doctest: +SKIP
    InvalidArgumentError: token ids must be < vocabulary_size=256: allowed ids
    are [0, vocabulary_size) with vocabulary_size=256. Received:
    token_ids[1, 1] = 300
    """
    _checks.instance("dataset", dataset, tf.data.Dataset, "a tf.data.Dataset")
    vocabulary_size = _token_ids.check_vocabulary_size(vocabulary_size)
    if token_id_path(dataset.element_spec, key) is None:
        raise ValueError(
            "`dataset` elements must hold integer token ids: `x`, or `x[key]` "
            f"with key={key!r}, in `x`, `(x,)`, `(x, y)` or `(x, y, "
            f"sample_weight)`. Received: element_spec={dataset.element_spec}"
        )
    return map_elements(dataset, lambda element: check_element(element, vocabulary_size, key))
