"""TokenIdCheck: fail loudly on token ids outside the vocabulary.

Also the two checks that the rest of the library runs outside compiled
functions (XLA drops assertions, see `TokenIdCheck`): `assert_token_ids`
for tensors (eager, `tf.function`, tf.data) and `check_token_ids_numpy` for
arrays. Both give the same message, naming the first offending id, where it
is, `vocabulary_size` and the allowed range.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer.ops.recompute import in_xla_context

# Ids come out as int32, so every id below the vocabulary size must fit.
_MAX_VOCABULARY_SIZE = 2**31


def _message(vocabulary_size, negative, where, value):
    # "must be < vocabulary_size=V" / "must be >= 0" are what callers (and
    # TF Serving clients) match on; the rest says what is allowed and what
    # came. `where` and `value` are str or string tensors.
    side = "must be >= 0" if negative else f"must be < vocabulary_size={vocabulary_size}"
    return (
        f"token ids {side}: allowed ids are [0, vocabulary_size) with "
        f"vocabulary_size={vocabulary_size}. Received: ", where, " = ", value,
    )


def check_token_ids_numpy(ids, vocabulary_size, name="token_ids"):
    """Raises a `ValueError` if an id of the integer array `ids` is outside
    `[0, vocabulary_size)`; returns `ids` (as a numpy array) otherwise.

    Non-integer arrays are returned unchecked: the model refuses their dtype.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        return ids
    # Compared in the ids' own dtype: an int64 2**32 + 5 is refused, not
    # wrapped into range by a cast.
    bad = (ids < 0) | (ids >= vocabulary_size)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"{name}[{', '.join(map(str, index))}]"
        value = ids[index]
        raise ValueError("".join(_message(vocabulary_size, value < 0, where, str(value))))
    return ids


def message_tensor(vocabulary_size, name, index, value, suffix=""):
    """The bad-id message as a string tensor: `value` (int64 scalar) found
    at `index` (int64 vector) of `name`, with `suffix` (a str) appended."""
    where = tf.strings.join([
        f"{name}[", tf.strings.reduce_join(tf.strings.as_string(index), separator=", "),
        "]",
    ])
    texts = [tf.strings.join([*_message(vocabulary_size, negative, where,
                                        tf.strings.as_string(value)), suffix])
             for negative in (True, False)]
    return tf.where(value < 0, texts[0], texts[1])


def assert_token_ids(ids, vocabulary_size, name="token_ids"):
    """`ids` (same dtype) behind an assertion that each is in
    `[0, vocabulary_size)`: an `InvalidArgumentError` naming the first bad id
    when it runs, eagerly, in a `tf.function` or in tf.data.

    Inside an XLA-compiled function it returns `ids` unchecked: XLA drops
    assertions (and cannot compile the message's string ops), so callers
    must run it outside the compiled step.
    """
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise TypeError(
            "token ids must be integers. Received: "
            f"{name}.dtype={ids.dtype.name}"
        )
    if in_xla_context():
        return ids
    wide, bad = out_of_range(ids, vocabulary_size)

    def message():
        index = tf.where(bad)[0]
        return message_tensor(vocabulary_size, name, index, tf.gather_nd(wide, index))

    return behind_assertion(ids, tf.reduce_any(bad), message)


def out_of_range(ids, vocabulary_size):
    """`(wide, bad)`: the integer `ids` as int64 and where they are outside
    `[0, vocabulary_size)`. int64 holds every id of every signed dtype and
    of uint8..uint32, so no id wraps into range; vocabulary_size <= 2**31
    fits too."""
    wide = tf.cast(ids, tf.int64)
    return wide, tf.logical_or(wide < 0, wide >= vocabulary_size)


def behind_assertion(ids, any_bad, message):
    """`ids` behind an assertion that `any_bad` is false, whose text is
    `message()`, a string tensor built only when it is true."""
    text = tf.cond(any_bad, message, lambda: tf.constant(""))
    check = tf.debugging.Assert(tf.logical_not(any_bad), [text])
    with tf.control_dependencies([check]):
        return tf.identity(ids)


@keras.saving.register_keras_serializable(package="keras_reformer")
class TokenIdCheck(keras.layers.Layer):
    """Identity on integer token ids that asserts `0 <= id < vocabulary_size`.

    An embedding lookup with an out-of-range id is an error on CPU but
    silently returns zeros or a clamped row on other devices and under XLA;
    this layer makes it an `InvalidArgumentError` naming the first bad id,
    its position and the vocabulary size, in eager mode, in `tf.function`
    and in an exported SavedModel (TF Serving answers such a request with
    INVALID_ARGUMENT).

    XLA drops assertions, so inside a `jit_compile=True` function the layer
    only casts. `ReformerBackbone` and `ReformerCausalLM` therefore check their
    inputs before the compiled step (`fit`, `evaluate`, `predict`, `*_on_batch`
    check arrays at once and tf.data inputs in the pipeline), and
    `keras_reformer.distribute.prepare_fit` checks each replica's batch in
    the plain graph around its XLA part. A model of your own that calls a
    `ReformerBackbone` inside a `jit_compile=True` step should get its data
    through `keras_reformer.data.check_token_ids`.

    The ids are checked in their own dtype and only then cast to int32, so
    an int64 id such as `2**32 + 5` is refused rather than wrapped into range.

    Args:
        vocabulary_size: int. The number of valid ids, at most `2**31` (the
            ids are returned as int32).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        token_ids: integer tensor of any shape and integer dtype.

    Returns:
        `token_ids` as an int32 tensor of the same shape, once checked.

    Example:

    >>> import numpy as np, keras_reformer as kr
    >>> check = kr.layers.TokenIdCheck(vocabulary_size=256)
    >>> check(np.array([[1, 2, 255]], dtype="int64")).dtype
    tf.int32
    >>> check(np.array([[256]]))  # doctest: +SKIP
    InvalidArgumentError: token ids must be < vocabulary_size=256: allowed ids
    are [0, vocabulary_size) with vocabulary_size=256. Received:
    token_ids[0, 0] = 256
    """

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = _checks.positive_int("vocabulary_size", vocabulary_size)
        if vocabulary_size > _MAX_VOCABULARY_SIZE:
            raise ValueError(
                f"`vocabulary_size` must be at most 2**31 (ids are int32). "
                f"Received: vocabulary_size={vocabulary_size}"
            )

    def _check_dtype(self, dtype):
        if not tf.as_dtype(dtype).is_integer:
            raise TypeError(
                "TokenIdCheck expects integer token ids. Received: "
                f"token_ids.dtype={tf.as_dtype(dtype).name}"
            )

    def call(self, token_ids):
        token_ids = tf.convert_to_tensor(token_ids)
        self._check_dtype(token_ids.dtype)
        return tf.cast(assert_token_ids(token_ids, self.vocabulary_size), tf.int32)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, token_ids):
        self._check_dtype(token_ids.dtype)
        return keras.KerasTensor(token_ids.shape, dtype="int32")

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config
