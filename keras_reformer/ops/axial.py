"""The axial position table, with a gradient that keeps nothing of it."""

import tensorflow as tf


def axial_positions(first, second, length, width, shape, dtype):
    """`concat(first[p // width], second[p % width])` for p < `length`, cast
    to `dtype` and broadcast to `shape` (batch, length, d1 + d2).

    Autodiff would keep the (length, d) table and both gathered halves alive
    until the backward pass reaches them (the gradients of `broadcast_to`
    and `concat` read their inputs' shapes at run time): three full-length
    tensors for the whole step, 128 MiB at 64K tokens and width 256. The
    gradient below needs only the positions.

    Args:
        first: (l1, d1) table; second: (l2, d2) table, same dtype.
        length: scalar, the positions used (<= l1 * l2).
        width: l2, python int.
        shape: the output shape, (batch, length, d1 + d2).
        dtype: the output dtype (the layer's compute dtype).
    """
    positions = tf.range(length)
    rows, cols = positions // width, positions % width

    @tf.custom_gradient
    def table(first, second):
        out = tf.concat([tf.gather(first, rows), tf.gather(second, cols)], axis=-1)
        out = tf.broadcast_to(tf.cast(out, dtype)[None], shape)

        def grad(d_out):
            d = tf.cast(tf.reduce_sum(d_out, axis=0), first.dtype)
            split = first.shape[-1]
            return (
                tf.math.unsorted_segment_sum(d[:, :split], rows, tf.shape(first)[0]),
                tf.math.unsorted_segment_sum(d[:, split:], cols, tf.shape(second)[0]),
            )

        return out, grad

    return table(first, second)
