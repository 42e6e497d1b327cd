"""TokenIdCheck: fail loudly on token ids outside the vocabulary."""

import keras
import tensorflow as tf

from keras_reformer import _checks

# Ids come out as int32, so every id below the vocabulary size must fit.
_MAX_VOCABULARY_SIZE = 2**31


@keras.saving.register_keras_serializable(package="keras_reformer")
class TokenIdCheck(keras.layers.Layer):
    """Identity on integer token ids that asserts `0 <= id < vocabulary_size`.

    An embedding lookup with an out-of-range id is an error on CPU but
    silently returns zeros or a clamped row on other devices and under XLA;
    this layer makes it an `InvalidArgumentError` naming the vocabulary size,
    in eager mode, in `tf.function` and in an exported SavedModel (TF Serving
    answers such a request with INVALID_ARGUMENT). XLA drops assertions, so
    under `jit_compile=True` the check is skipped: validate training data in
    the input pipeline.

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
    InvalidArgumentError: token ids must be < vocabulary_size=256 ...
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
        checks = [
            tf.debugging.assert_non_negative(
                token_ids,
                message=f"token ids must be >= 0 (vocabulary_size={self.vocabulary_size})",
            )
        ]
        # An id of a narrow dtype (uint8: at most 255) may not be able to
        # reach the vocabulary size; casting the size down would wrap it.
        if token_ids.dtype.max >= self.vocabulary_size:
            checks.append(
                tf.debugging.assert_less(
                    token_ids, tf.constant(self.vocabulary_size, token_ids.dtype),
                    message=f"token ids must be < vocabulary_size={self.vocabulary_size}",
                )
            )
        ids = tf.cast(token_ids, tf.int32)
        # identity: a cast to the same dtype makes no op to hang the checks on.
        with tf.control_dependencies(checks):
            return tf.identity(ids)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, token_ids):
        self._check_dtype(token_ids.dtype)
        return keras.KerasTensor(token_ids.shape, dtype="int32")

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config
