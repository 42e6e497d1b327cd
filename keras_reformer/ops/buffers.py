"""Buffers updated a few rows at a time, in place where TensorFlow allows.

A decoding loop writes one entry per token into buffers sized by the longest
sequence (a cache's keys and values, the generated ids). Outside XLA,
`tensor_scatter_nd_update` copies the whole buffer: O(max_length) per token.
`set_rows(..., in_place=True)` overwrites the buffer's own memory instead,
for buffers the caller owns (`own`).
"""

import tensorflow as tf

from keras_reformer.ops.recompute import dependency_zero


def own(buffers):
    """A private copy of every buffer (any nest of tensors): what
    `set_rows(..., in_place=True)` may overwrite. (A buffer might otherwise
    be shared with a caller's tensor or a constant: `tf.pad` by zero
    forwards its input.)"""
    return tf.nest.map_structure(lambda t: tf.raw_ops.DeepCopy(x=t), buffers)


def set_rows(buffer, rows, updates, in_place, after=()):
    """`buffer` with some rows of its flat view set to `updates`.

    The flat view is `buffer` reshaped to (-1, row size), the row size being
    that of one update: keys (B, H, M, D) with (B * H, D) updates are seen as
    (B * H * M, D); a ring (B, H, R, K, S) with one int per update as
    (B * H * R * K * S, 1).

    Args:
        buffer: the tensor to update.
        rows: (N,) int32 distinct row numbers of the flat view.
        updates: N rows (any shape whose size is N * the row size).
        in_place: overwrite `buffer`'s memory (TensorFlow graph mode): O(row)
            instead of a copy of the whole buffer, which is what
            `tensor_scatter_nd_update` costs outside XLA. Only for buffers the
            caller owns (see `own`) and never reads again; not under XLA,
            which has no such op (and updates loop buffers in place anyway).
        after: tensors that read `buffer` and must be computed before it is
            overwritten.

    Returns:
        The updated buffer (with `in_place`, the same memory).
    """
    shape = tf.shape(buffer)
    count = tf.shape(rows)[0]
    row_size = tf.size(updates) // count
    flat = tf.reshape(buffer, [-1, row_size])
    updates = tf.reshape(tf.cast(updates, buffer.dtype), [count, row_size])
    if in_place:
        # InplaceUpdate writes into its input's buffer (an alias, not a copy).
        # Nothing orders it after the reads of the old contents but these
        # control dependencies.
        with tf.control_dependencies(list(after)):
            flat = tf.raw_ops.InplaceUpdate(x=flat, i=rows, v=updates)
    else:
        if after and not tf.executing_eagerly():
            # XLA ignores control dependencies: unless the new contents depend
            # on the reads, it may schedule the scatter first and then copy
            # the whole buffer (twice, measured) so that the reads see the
            # old one -- O(max_length) per token.
            zero = tf.add_n([dependency_zero(t) for t in after])
            updates = updates + tf.cast(zero, updates.dtype)
        flat = tf.tensor_scatter_nd_update(flat, rows[:, None], updates)
    return tf.reshape(flat, shape)
