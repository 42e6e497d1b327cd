"""keras.layers.LayerNormalization with a lighter gradient (ops.layer_norm)."""

import keras
import tensorflow as tf

from keras_reformer.ops.layer_norm import layer_norm


@keras.saving.register_keras_serializable(package="keras_reformer")
class LayerNorm(keras.layers.LayerNormalization):
    """The same layer, weights and config as `keras.layers.LayerNormalization`;
    over the last axis with centre and scale (the blocks' case) its gradient
    keeps only the input and per-row statistics (see `ops.layer_norm`).

    Over the last axis it also takes a list of tensors, the parts of its
    input along that axis: it normalizes their concatenation, and its
    gradient keeps the parts, not the concatenation.
    """

    def build(self, input_shape):
        if _is_parts(input_shape):
            input_shape = _concatenated(input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        if _is_parts(input_shape):
            return _concatenated(input_shape)
        return super().compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        if isinstance(mask, (list, tuple)):
            # As `Concatenate` does along the last axis: a position is kept
            # where every part keeps it.
            masks = [m for m in mask if m is not None]
            if not masks:
                return None
            out = masks[0]
            for m in masks[1:]:
                out = keras.ops.logical_and(out, m)
            return out
        return mask

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            # Only the last axis (the case the parts are for).
            if not self._plain_last_axis(len(inputs[0].shape)):
                return super().call(keras.ops.concatenate(inputs, axis=-1))
            parts = [keras.ops.cast(p, self.compute_dtype) for p in inputs]
            return tf.cast(layer_norm(parts, *self._weights(), self.epsilon),
                           self.compute_dtype)
        if not self._plain_last_axis(len(inputs.shape)):
            return super().call(inputs)
        return tf.cast(layer_norm(inputs, *self._weights(), self.epsilon),
                       self.compute_dtype)

    def _plain_last_axis(self, rank):
        axes = [a % rank for a in (self.axis if isinstance(self.axis, (list, tuple))
                                   else [self.axis])]
        return (axes == [rank - 1] and self.center and self.scale
                and not self.rms_scaling)

    def _weights(self):
        # Through `.value`, so that a stateless scope (the block loop) maps
        # the weights as it does for every other layer.
        return (tf.convert_to_tensor(self.gamma.value),
                tf.convert_to_tensor(self.beta.value))


def _is_parts(shape):
    return isinstance(shape, (list, tuple)) and bool(shape) and isinstance(
        shape[0], (list, tuple))


def _concatenated(shapes):
    widths = [s[-1] for s in shapes]
    width = None if any(w is None for w in widths) else sum(widths)
    return tuple(shapes[0][:-1]) + (width,)
