"""Layer normalization over the last axis, with a gradient that keeps only
the input and two numbers per row."""

import keras
import tensorflow as tf


def layer_norm(x, gamma, beta, epsilon):
    """`(x - mean) / sqrt(var + epsilon) * gamma + beta` over the last axis,
    computed in float32 (or float64), returned in `x`'s dtype.

    Autodiff through the moments keeps two more full-size tensors per call
    (the centred input and its scaled copy) until the backward pass reaches
    them: in a reversible block's recomputation at 64K tokens and width 256,
    128 MiB. This gradient keeps `x`, the mean and the reciprocal standard
    deviation, and recomputes the normalized input.
    """
    compute = tf.float64 if x.dtype == tf.float64 else tf.float32

    @tf.custom_gradient
    def norm(x, gamma, beta):
        wide = tf.cast(x, compute)
        # Keras' own forward arithmetic, to the rounding: a cached decoding
        # step must normalize a position exactly as the full pass did, or a
        # near-tie in the hashing can put it in another bucket.
        mean, variance = keras.ops.moments(wide, axes=[-1], keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        scale = rstd * tf.cast(gamma, compute)
        out = wide * scale + (tf.cast(beta, compute) - mean * scale)

        def grad(d_out):
            d_out = tf.cast(d_out, compute)
            normed = (tf.cast(x, compute) - mean) * rstd
            rows = list(range(len(x.shape) - 1))
            d_gamma = tf.reduce_sum(d_out * normed, axis=rows)
            d_beta = tf.reduce_sum(d_out, axis=rows)
            d_normed = d_out * tf.cast(gamma, compute)
            d_x = rstd * (
                d_normed
                - tf.reduce_mean(d_normed, axis=-1, keepdims=True)
                - normed * tf.reduce_mean(d_normed * normed, axis=-1, keepdims=True)
            )
            return (tf.cast(d_x, x.dtype), tf.cast(d_gamma, gamma.dtype),
                    tf.cast(d_beta, beta.dtype))

        return tf.cast(out, x.dtype), grad

    return norm(x, gamma, beta)
