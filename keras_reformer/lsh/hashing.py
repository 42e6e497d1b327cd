"""The math of LSH attention (Kitaev et al., 2020, section 2), as pure functions.

This module is the one place where the layers reach for `tf.*` directly:
batched gathers (`batch_dims`), argsort and `tf.cond` on dynamic lengths have
no `keras.ops` equivalents with the same cost.

Shapes use: B batch, H heads, R hash rounds, L (padded) length, N = L / C
chunks of C = bucket_size positions, W = C * (chunks_before + 1 +
chunks_after) keys per chunk, D key width, E value width.
"""

import math

import tensorflow as tf

from keras_reformer._compat import xla_sort
from keras_reformer.ops import recompute
from keras_reformer.ops.chunk_attention import (
    GROUP_ELEMENTS,
    bias_from_masks,
    dropout_keep,
    pairs_attention,
)

# Above this many buckets the (D x buckets/2) projection costs more than the
# chunked attention itself (2 * C keys per query at C = 64), so derived bucket
# counts are factorized into two hashes of about sqrt(buckets) each.
DEFAULT_FACTORIZE_ABOVE = 256


def derived_num_buckets(padded_length, bucket_size):
    """Bucket count used when `num_buckets=None`: 2 * length / bucket_size.

    Gives buckets of about bucket_size / 2 positions, so a bucket rarely
    spills over a chunk (the paper's choice). Always even and at least 2.
    The layer fixes it at build time from a static length, never from a
    batch's (padded) length, so it takes python ints only.
    """
    return max(2, 2 * (padded_length // bucket_size))


def factor_num_buckets(num_buckets):
    """Split an even bucket count into two even factors with product >= it."""
    first = 2 * math.ceil(math.sqrt(num_buckets) / 2)
    second = 2 * math.ceil(num_buckets / first / 2)
    return first, second


def hash_vectors(vectors, rotations):
    """Angular LSH: bucket = argmax([xR; -xR]), one or two (factorized) hashes.

    Args:
        vectors: (B, H, L, D) float32.
        rotations: list of one or two (D, R, n_i / 2) float32 tensors.

    Returns:
        (B, H, R, L) int32 bucket ids in [0, prod(n_i)).
    """
    with tf.name_scope("lsh_hash"):  # scopes name the profile's categories
        return _hash(vectors, rotations)


def _hash(vectors, rotations):
    buckets = None
    stride = None
    for rotation in rotations:
        projected = tf.einsum("bhld,drk->bhrlk", vectors, rotation)
        index = tf.argmax(
            tf.concat([projected, -projected], axis=-1),
            axis=-1,
            output_type=tf.int32,
        )
        size = 2 * tf.shape(rotation)[-1]
        if buckets is None:
            buckets, stride = index, size
        else:
            buckets, stride = buckets + stride * index, stride * size
    return buckets


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


def _unit(vectors):
    """Keys are the unit-normalised queries (shared QK)."""
    return vectors * tf.math.rsqrt(
        tf.maximum(tf.reduce_sum(tf.square(vectors), -1, keepdims=True), 1e-12)
    )


def window_covers_all(num_chunks, chunks_before, chunks_after):
    """True when every non-causal query's chunk window spans the whole input.

    Then non-causal LSH attention is full attention, computed densely
    (exactly, and cheaper than hashing). The causal rule (own bucket) has no
    such shortcut. Works on python ints and scalar tensors.
    """
    return num_chunks - 1 <= min(chunks_before, chunks_after)


def dense_attend(qk, values, valid, *, dropout_rate=0.0, dropout_seed=None):
    """Plain non-causal shared-QK softmax attention, (B, H, L, E), for short
    inputs with no explicit mask (see `window_covers_all`)."""
    scale = 1.0 / math.sqrt(float(qk.shape[-1]))
    logits = tf.matmul(qk, _unit(qk), transpose_b=True) * scale  # (B,H,L,L)
    positions = tf.range(tf.shape(qk)[2])
    masked = tf.logical_not(valid)[:, None, None, :]
    same = positions[:, None] == positions[None, :]
    probs = tf.nn.softmax(logits + bias_from_masks(same, masked, qk.dtype), axis=-1)
    if dropout_rate > 0:
        probs = probs * dropout_keep(tf.shape(probs), dropout_rate, dropout_seed,
                                     qk.dtype)
    return tf.matmul(probs, values)


def lsh_attend(qk, values, buckets, num_buckets, valid, *, bucket_size,
               chunks_before=1, chunks_after=0, causal=False,
               pair_allowed=None, row_causal=None, sliding_window=None,
               dropout_rate=0.0, dropout_seed=None,
               group_elements=GROUP_ELEMENTS, strict=False):
    """Chunked attention within sorted buckets, rounds combined by logsumexp.

    Args:
        qk: (B, H, L, D) float32 shared query/key vectors; L % C == 0.
        values: (B, H, L, E) float32.
        buckets: (B, H, R, L) int32 from `hash_vectors`.
        num_buckets: int or int32 scalar tensor.
        valid: (B, L) bool; False marks padding (never a key, sorted last).
        bucket_size: C, the chunk length.
        chunks_before, chunks_after: chunks each chunk also attends to.
        causal: mask keys at later original positions; a causal query sees
            only keys of its own bucket at most `chunks_before * C` sorted
            slots back, so its output never depends on later tokens.
        pair_allowed: optional (Bm, Hm, L, L) bool mask of allowed
            (query, key), Bm in {1, B}, Hm in {1, H} (broadcast).
        row_causal: optional (Bm, Hm) bool: mask rows that admit no later
            key, which then follow the causal rule (see `chunk_bias`).
        sliding_window: None or int; keys with |query - key| >= it are masked.
        dropout_rate, dropout_seed: attention dropout and its (2,) int32 seed.
        group_elements: logits computed at once (bounds memory, see
            `chunk_attention`).
        strict: causal queries never attend to themselves; one with no
            earlier key in any round outputs zeros (see `shifted_values`).

    Returns:
        (B, H, L, E) float32 attention output.
    """
    batch, heads = tf.shape(qk)[0], qk.shape[1]
    length = tf.shape(qk)[2]
    order, inverse, sorted_buckets = sort_order(buckets, valid, num_buckets)
    static_pairs = None if qk.shape[0] is None else qk.shape[0] * heads

    def pairs(x):
        """(B, H, ...) -> (B * H, ...), keeping static sizes."""
        flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
        return tf.ensure_shape(flat, [static_pairs] + x.shape[2:].as_list())

    def per_pair(x):
        """(B, ...) -> (B * H, ...): the same row for every head."""
        return pairs(tf.repeat(x[:, None], heads, axis=1))

    mask_row = tf.zeros([batch, heads], tf.int32)
    flat_pair = flat_causal = None
    if pair_allowed is not None:
        rows_b, rows_h = pair_allowed.shape[0], pair_allowed.shape[1]
        b_index = tf.range(batch)[:, None] if rows_b != 1 else tf.zeros([batch, 1], tf.int32)
        h_index = tf.range(heads)[None, :] if rows_h != 1 else tf.zeros([1, heads], tf.int32)
        mask_row = b_index * rows_h + h_index
        flat_pair = tf.reshape(pair_allowed, [rows_b * rows_h, -1])
        if row_causal is not None:
            flat_causal = tf.reshape(row_causal, [-1])
    ints = {
        "order": pairs(order),
        "inverse": pairs(inverse),
        "bucket": pairs(sorted_buckets),
        "valid": per_pair(valid),
        "mask_row": pairs(mask_row),
    }
    out = pairs_attention(
        pairs(qk),
        pairs(values),
        ints,
        bucket_size=bucket_size,
        window=(chunks_before, chunks_after),
        causal=causal,
        length=length,
        pair_allowed=flat_pair,
        row_causal=flat_causal,
        sliding_window=sliding_window,
        rate=dropout_rate,
        seed=dropout_seed,
        budget=group_elements,
        strict=strict,
    )
    return tf.reshape(out, [batch, heads, length, values.shape[-1]])


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
