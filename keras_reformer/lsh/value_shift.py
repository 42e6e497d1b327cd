"""Shifted values (`LSHAttention(value_shift=True)`): the key at position j
brings the value of the next real position after j."""

import tensorflow as tf


def shifted_values(values, valid):
    """(B, H, L, E) values moved one real position back: the key at j
    brings the value of the next position after j that `valid` (B, L)
    marks real, zeros where none follows.

    With a strict causal rule (keys j < i) and a symmetric score, a query
    that matches an earlier occurrence of its own token reads what followed
    it, the lookup shared QK cannot express with unshifted values.
    """
    length = tf.shape(values)[2]
    positions = tf.range(length)
    # The real positions in order (then `length` for the rest); the number
    # of real positions up to j indexes the first real one after j.
    real = tf.sort(tf.where(valid, positions[None], length), axis=1)
    seen = tf.cumsum(tf.cast(valid, tf.int32), axis=1)
    padded = tf.concat([real, tf.fill([tf.shape(real)[0], 1], length)], 1)
    after = tf.gather(padded, seen, batch_dims=1)  # (B, L), `length`: none
    moved = tf.gather(values, tf.minimum(after, length - 1), axis=2, batch_dims=1)
    keep = tf.cast(after < length, values.dtype)[:, None, :, None]
    return moved * keep
