"""keras.layers.LayerNormalization with a lighter gradient (ops.layer_norm)."""

import keras
import tensorflow as tf

from keras_reformer.ops.layer_norm import layer_norm


@keras.saving.register_keras_serializable(package="keras_reformer")
class LayerNorm(keras.layers.LayerNormalization):
    """The same layer, weights and config as `keras.layers.LayerNormalization`;
    over the last axis with centre and scale (the blocks' case) its gradient
    keeps only the input and per-row statistics (see `ops.layer_norm`)."""

    def call(self, inputs):
        rank = len(inputs.shape)
        axes = [a % rank for a in (self.axis if isinstance(self.axis, (list, tuple))
                                   else [self.axis])]
        if not (axes == [rank - 1] and self.center and self.scale
                and not self.rms_scaling):
            return super().call(inputs)
        # Through `.value`, so that a stateless scope (the block loop) maps
        # the weights as it does for every other layer.
        gamma = tf.convert_to_tensor(self.gamma.value)
        beta = tf.convert_to_tensor(self.beta.value)
        return tf.cast(layer_norm(inputs, gamma, beta, self.epsilon), self.compute_dtype)
