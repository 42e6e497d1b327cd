"""The sorted order of hash rounds (Kitaev et al., 2020, section 2): each
round orders a row's positions by (bucket, position), padding last.

Shapes: B batch, H heads, R rounds, L positions.
"""

import collections

import tensorflow as tf

from keras_reformer._compat import xla_sort
from keras_reformer.ops import recompute

# `order`: sorted slot -> original position; `inverse`: original position ->
# sorted slot; `buckets`: the bucket at each sorted slot; each (B, H, R, L).
SortedOrder = collections.namedtuple("SortedOrder", ["order", "inverse", "buckets"])


def sort_order(buckets, valid, num_buckets):
    """Per-round order of positions by (bucket, position), and its inverse.

    Invalid (padding) positions are moved into an extra bucket past the last
    one, so they sit at the end of the sorted sequence and never take chunk
    slots from real tokens: real outputs do not depend on how much padding
    there is. The sort key `bucket * L + position` has no ties, so the order
    is the same whatever the sort's stability.

    Args:
        buckets: (B, H, R, L) int32.
        valid: (B, L) bool.
        num_buckets: int or int32 scalar tensor, the bucket count.

    Returns:
        A `SortedOrder` of (B, H, R, L) int32 tensors.
    """
    with tf.name_scope("lsh_sort"):
        return _sort_order(buckets, valid, num_buckets)


def _sort_order(buckets, valid, num_buckets):
    length = tf.shape(buckets)[-1]
    length64 = tf.cast(length, tf.int64)
    buckets = tf.where(valid[:, None, None, :], buckets, num_buckets)
    # int64 keys: (num_buckets + 1) * L overflows int32 beyond ~256K tokens.
    slots = tf.range(length, dtype=tf.int64)
    key = tf.cast(buckets, tf.int64) * length64 + slots
    if not recompute.in_xla_context():
        order = tf.cast(tf.argsort(key, axis=-1), tf.int32)
        sorted_buckets = tf.gather(buckets, order, axis=3, batch_dims=3)
        return SortedOrder(order, _inverse_permutations(order), sorted_buckets)
    # The keys have no ties, so sorting them alone gives the order and the
    # sorted buckets by arithmetic: XLA:CPU sorts one operand much faster
    # than argsort's TopK of (key, index) pairs (`profile_step.py --jit` at
    # 4K: TopK 0.043 s per step, both key sorts together 0.012 s).
    sorted_key = xla_sort(key)
    order = tf.cast(sorted_key % length64, tf.int32)
    sorted_buckets = tf.cast(sorted_key // length64, tf.int32)
    # The inverse the same way: sorting the tie-free keys order * L + slot
    # puts, at position p, the slot that holds p. (The scatter of graph mode
    # needs a reshape to a shape computed at run time, which XLA refuses.)
    inverse = xla_sort(tf.cast(order, tf.int64) * length64 + slots) % length64
    return SortedOrder(order, tf.cast(inverse, tf.int32), sorted_buckets)


def _inverse_permutations(order):
    """The inverse of each row of `order` (permutations along the last axis).

    A scatter in one pass, where a second argsort would sort again. The rows
    are laid end to end as one permutation of B*H*R*L positions; int32
    suffices, as a tensor of 2^31 elements would not fit in memory anyway.
    """
    shape = tf.shape(order)
    rows = tf.reduce_prod(shape[:-1])
    offsets = tf.reshape(tf.range(rows) * shape[-1], tf.concat([shape[:-1], [1]], 0))
    flat = tf.reshape(order + offsets, [-1])
    return tf.reshape(tf.math.invert_permutation(flat), shape) - offsets
