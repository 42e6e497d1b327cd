"""Inverted dropout from a stateless seed.

The same seed gives the same mask, so a recomputation (a reversible stack's
backward pass, a slice-by-slice or group-by-group gradient) drops exactly
what the forward pass dropped, as long as both run in the same mode: the
numbers drawn with and without XLA differ.
"""

import tensorflow as tf


def keep_mask(shape, rate, seed, dtype=tf.float32):
    """The dropout multiplier of `shape`: 0 where dropped, 1 / (1 - rate)
    where kept, from a (2,) int32 `seed`."""
    uniform = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32, alg="philox")
    return tf.cast(uniform >= rate, dtype) * (1.0 / (1.0 - rate))


def dropout(x, rate, seed):
    """`x` with inverted dropout at `rate`, the mask drawn from `seed`."""
    return x * keep_mask(tf.shape(x), rate, seed, x.dtype)
