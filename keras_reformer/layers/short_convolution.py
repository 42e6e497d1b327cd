"""ShortConvolution: each position mixes in its few nearest neighbours."""

import keras
import tensorflow as tf

from keras_reformer import _checks


@keras.saving.register_keras_serializable(package="keras_reformer")
class ShortConvolution(keras.layers.Layer):
    """A 1-D convolution of width `width` over positions, padding held at zero.

    Output position `t` is `bias + sum_k x[t - width + 1 + k] @ kernel[k]`
    (causal) or the same window centred on `t` (`causal=False`); positions
    outside the sequence and padded positions (mask 0) count as zeros, so
    padding never changes a real position's output.

    Why a Reformer wants it: LSH attention reaches the previous few tokens
    only when the hash puts them in the query's bucket, and early in
    training it rarely does, so a byte model sits at the bigram level for a
    long time (docs/learning.md). Added to the embeddings, this layer hands
    every position its immediate predecessors directly, and attention is
    left the long-range work.

    Args:
        width: int >= 1. Positions per window.
        causal: bool. Windows end at the position (language models) or are
            centred on it. Defaults to `True`.
        kernel_initializer: initializer of the `(width, features, features)`
            kernel. Defaults to `"glorot_uniform"`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor `(batch, length, features)`.
        mask: optional `(batch, length)` bool/int, 0 on padding.

    Returns:
        A tensor of the shape of `inputs` (add it to the inputs yourself).

    Example:

    >>> import keras, keras_reformer as kr
    >>> layer = kr.layers.ShortConvolution(3)
    >>> x = keras.random.normal((2, 10, 16))
    >>> (x + layer(x)).shape
    TensorShape([2, 10, 16])
    """

    def __init__(self, width, causal=True, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(**kwargs)
        self.width = _checks.positive_int("width", width)
        self.causal = _checks.boolean("causal", causal)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        features = input_shape[-1]
        if features is None:
            raise ValueError(
                "ShortConvolution needs a known feature size. Received: "
                f"input_shape={input_shape}"
            )
        self.kernel = self.add_weight(
            name="kernel", shape=(self.width, features, features),
            initializer=self.kernel_initializer,
        )
        self.bias = self.add_weight(name="bias", shape=(features,), initializer="zeros")

    def _pads(self):
        if self.causal:
            return self.width - 1, 0
        return (self.width - 1) // 2, self.width // 2

    def call(self, inputs, mask=None):
        x = inputs
        if mask is not None:
            x = x * tf.cast(mask, x.dtype)[..., None]
        left, right = self._pads()
        x = tf.pad(x, [[0, 0], [left, right], [0, 0]])
        out = tf.nn.conv1d(x, tf.cast(self.kernel, x.dtype), stride=1, padding="VALID")
        return out + tf.cast(self.bias, out.dtype)

    def last_position(self, window):
        """The causal output at the last position of a `(batch, width, features)`
        window (oldest first, padding already zeroed): one decode step."""
        if not self.causal:
            raise ValueError("last_position needs a causal ShortConvolution.")
        kernel = tf.cast(self.kernel, window.dtype)
        out = tf.einsum("bwi,wio->bo", window, kernel)
        return out + tf.cast(self.bias, out.dtype)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            width=self.width, causal=self.causal,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
