"""TokenIdCheck: fail loudly on token ids outside the vocabulary."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_reformer")
class TokenIdCheck(keras.layers.Layer):
    """Identity on int token ids that asserts `0 <= id < vocabulary_size`.

    An embedding lookup with an out-of-range id is an error on CPU but
    silently returns zeros or a clamped row on other devices and under XLA;
    this makes it an `InvalidArgumentError` naming the vocabulary size, in
    eager mode, in `tf.function` and in an exported SavedModel (TF Serving
    answers such a request with INVALID_ARGUMENT). XLA drops assertions, so
    under `jit_compile=True` the check is skipped: validate training data in
    the input pipeline.

    Args:
        vocabulary_size: the number of valid ids.
    """

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size

    def call(self, token_ids):
        token_ids = tf.cast(token_ids, tf.int32)
        checks = [
            tf.debugging.assert_non_negative(
                token_ids, message="token ids must be >= 0"
            ),
            tf.debugging.assert_less(
                token_ids, self.vocabulary_size,
                message=f"token ids must be < vocabulary_size={self.vocabulary_size}",
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(token_ids)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, token_ids):
        return keras.KerasTensor(token_ids.shape, dtype="int32")

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config
