"""Sorting positions into hash-round order and back (Kitaev et al., 2020,
section 2): each round orders a row's positions by (bucket, position).

The gathers into and out of sorted order have gathers as gradients: the
gradient of a gather is a scatter-add, slow on CPU, but these gathers use
permutations whose inverse is known. The permutations are arguments, not
closures, so that TF's custom-gradient check does not trace them back to the
projection weights.

Shapes: B batch, H heads, R rounds, L positions; `rows` (batch, head) rows.
"""

import tensorflow as tf

from keras_reformer._compat import xla_sort
from keras_reformer.ops import recompute


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
        order: (B, H, R, L) int32, sorted position -> original position.
        inverse: (B, H, R, L) int32, original position -> sorted position.
        sorted_buckets: (B, H, R, L) int32, the bucket at each sorted slot.
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
        return order, _inverse_permutations(order), sorted_buckets
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
    return order, tf.cast(inverse, tf.int32), sorted_buckets


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


def gather_rounds(x, order, inverse):
    """x (rows, L, ...) -> (rows, R, L, ...) in each round's sorted order.

    Gradient: the upstream gathered back by `inverse`, summed over rounds.
    """

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            back = tf.gather(upstream, inverse, axis=2, batch_dims=2)
            return tf.reduce_sum(back, axis=1), None, None

        return tf.gather(x, order, axis=1, batch_dims=1), grad

    with tf.name_scope("lsh_gather"):  # scopes name the profile's categories
        return forward(x, order, inverse)


def unsort_rounds(x, order, inverse):
    """x (rows, R, L, ...) in sorted order -> original order (gradient: gather)."""

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            return tf.gather(upstream, order, axis=2, batch_dims=2), None, None

        return tf.gather(x, inverse, axis=2, batch_dims=2), grad

    with tf.name_scope("lsh_unsort"):
        return forward(x, order, inverse)
