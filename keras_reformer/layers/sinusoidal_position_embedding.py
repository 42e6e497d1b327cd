"""SinusoidalPositionEmbedding: fixed sin/cos positions (no weights)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_reformer")
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """The Transformer's sin/cos position encodings, broadcast to the input.

    Args:
        max_sequence_length: longest input accepted (longer inputs raise a
            `ValueError` when the length is static, an `InvalidArgumentError`
            at run time otherwise).
        max_wavelength: the longest wavelength (default 10000).
    """

    def __init__(self, max_sequence_length, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_sequence_length = max_sequence_length
        self.max_wavelength = max_wavelength
        self.supports_masking = True

    def call(self, inputs):
        length = inputs.shape[1]
        if length is not None and length > self.max_sequence_length:
            raise ValueError(
                f"Input length {length} exceeds max_sequence_length="
                f"{self.max_sequence_length}."
            )
        if length is None:
            length = tf.shape(inputs)[1]
            with tf.control_dependencies([
                tf.debugging.assert_less_equal(
                    length, self.max_sequence_length,
                    message="Input length exceeds max_sequence_length="
                    f"{self.max_sequence_length}.",
                )
            ]):
                length = tf.identity(length)
        width = inputs.shape[-1]
        positions = tf.cast(tf.range(length), tf.float32)[:, None]
        rates = tf.pow(
            float(self.max_wavelength),
            -tf.cast(tf.range(0, width, 2), tf.float32) / float(width),
        )
        angles = positions * rates[None, :]
        table = tf.reshape(tf.stack([tf.sin(angles), tf.cos(angles)], -1),
                           [length, -1])[:, :width]
        return tf.broadcast_to(tf.cast(table, self.compute_dtype)[None], tf.shape(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(max_sequence_length=self.max_sequence_length,
                      max_wavelength=self.max_wavelength)
        return config
