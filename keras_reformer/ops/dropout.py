"""Inverted dropout from a stateless seed.

The same seed gives the same mask, so a recomputation (a reversible stack's
backward pass, a slice-by-slice or group-by-group gradient) drops exactly
what the forward pass dropped. The mask is a hash of each element's flat
position and the seed, in uint32 arithmetic: the same mask in eager mode, in
graph mode and under XLA. (TensorFlow's stateless Philox, drawn inside a
loop body as the sliced feed-forward and chunked attention draw it, ran ~4x
slower under XLA than in graph mode on a CPU and made XLA's training step
slower than graph mode's; the hash is cheaper in both modes.)
"""

import tensorflow as tf

_U32 = tf.uint32
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive positions


def _mix(h):
    """A 32-bit integer finalizer (two multiply-xorshift rounds): each
    output bit depends on every input bit."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, _U32)))
    h = h * tf.constant(0x7FEB352D, _U32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(15, _U32)))
    h = h * tf.constant(0x846CA68B, _U32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, _U32)))


def keep_bits(shape, seed):
    """uint32 hash bits of `shape`, one per element, from a (2,) int32 `seed`."""
    words = tf.bitcast(tf.cast(seed, tf.int32), _U32)
    key = _mix(tf.bitwise.bitwise_xor(words[0], _mix(words[1] + tf.constant(_GOLDEN, _U32))))
    shape = tf.cast(shape, tf.int32)
    position = tf.bitcast(tf.range(tf.reduce_prod(shape), dtype=tf.int32), _U32)
    bits = _mix(tf.bitwise.bitwise_xor(position * tf.constant(_GOLDEN, _U32), key))
    return tf.reshape(bits, shape)


def keep_mask(shape, rate, seed, dtype=tf.float32):
    """The dropout multiplier of `shape`: 0 where dropped, 1 / (1 - rate)
    where kept, from a (2,) int32 `seed`. An element is dropped when its
    hash is below `rate * 2**32`."""
    threshold = tf.constant(min(int(round(rate * 2**32)), 2**32 - 1), _U32)
    keep = keep_bits(shape, seed) >= threshold
    return tf.cast(keep, dtype) * (1.0 / (1.0 - rate))


def dropout(x, rate, seed):
    """`x` with inverted dropout at `rate`, the mask drawn from `seed`."""
    return x * keep_mask(tf.shape(x), rate, seed, x.dtype)
