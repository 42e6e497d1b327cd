"""SinusoidalPositionEmbedding: fixed sin/cos positions (no weights)."""

import keras
import tensorflow as tf

from keras_reformer import _checks


@keras.saving.register_keras_serializable(package="keras_reformer")
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """The Transformer's fixed sin/cos position encodings, broadcast to the input.

    Feature `2k` of position `p` is `sin(p / max_wavelength**(2k / d))` and
    feature `2k + 1` is `cos` of the same angle, with `d` the input's
    feature size (Vaswani et al., 2017). The layer has no weights; add its
    output to the inputs yourself, as with `AxialPositionEmbedding`.

    Args:
        max_sequence_length: int. The longest input accepted. Longer inputs
            raise a `ValueError` when the length is static and an
            `InvalidArgumentError` at run time otherwise (dropped under
            `jit_compile=True`, where XLA removes assertions).
        max_wavelength: float. The longest wavelength. Defaults to `10000`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor of shape `(batch, length, features)`. Only its shape
            and the layer's dtype are used.

    Returns:
        A tensor of the shape of `inputs`, in the layer's compute dtype.

    Example:

    >>> import keras, keras_reformer as kr
    >>> layer = kr.layers.SinusoidalPositionEmbedding(512)
    >>> x = keras.random.normal((2, 100, 64))
    >>> (x + layer(x)).shape
    TensorShape([2, 100, 64])
    """

    def __init__(self, max_sequence_length, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_sequence_length = _checks.positive_int(
            "max_sequence_length", max_sequence_length
        )
        self.max_wavelength = _checks.positive_number("max_wavelength", max_wavelength)
        self.supports_masking = True

    def call(self, inputs):
        length = _checks.sequence_length(
            inputs, self.max_sequence_length,
            f"exceeds max_sequence_length={self.max_sequence_length}.",
        )
        table = self.embedding_at(tf.range(length), inputs.shape[-1])
        return tf.broadcast_to(table[None], tf.shape(inputs))

    def embedding_at(self, positions, features):
        """The embeddings of the given positions (any int32 shape), e.g. one
        per row in cached decoding: `positions.shape + (features,)`, in the
        compute dtype."""
        rates = tf.pow(
            self.max_wavelength,
            -tf.cast(tf.range(0, features, 2), tf.float32) / float(features),
        )
        angles = tf.cast(positions, tf.float32)[..., None] * rates
        # Interleaves sin and cos: (..., features / 2, 2) -> (..., features).
        table = tf.stack([tf.sin(angles), tf.cos(angles)], -1)
        table = tf.reshape(table, tf.concat([tf.shape(positions), [-1]], 0))
        return tf.cast(table[..., :features], self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(max_sequence_length=self.max_sequence_length,
                      max_wavelength=self.max_wavelength)
        return config
