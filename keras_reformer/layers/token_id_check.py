"""TokenIdCheck: fail loudly on token ids outside the vocabulary.

The checks themselves (and those the rest of the library runs outside
compiled functions) are in `keras_reformer._token_ids`.
"""

import keras
import tensorflow as tf

from keras_reformer import _token_ids


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
        self.vocabulary_size = _token_ids.check_vocabulary_size(vocabulary_size)

    def call(self, token_ids):
        token_ids = _token_ids.assert_token_ids(token_ids, self.vocabulary_size)
        return tf.cast(token_ids, tf.int32)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, token_ids):
        _token_ids.check_integer_dtype(token_ids.dtype)
        return keras.KerasTensor(token_ids.shape, dtype="int32")

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config
