"""The math of LSH attention (REFORMER.md section 2), as pure functions.

This module is the one place where the layers reach for `tf.*` directly:
batched gathers (`batch_dims`), argsort and `tf.cond` on dynamic lengths have
no `keras.ops` equivalents with the same cost.

Shapes use: B batch, H heads, R hash rounds, L (padded) length, N = L / C
chunks of C = bucket_size positions, W = C * (chunks_before + 1 +
chunks_after) keys per chunk, D key width, E value width.
"""

import math

import tensorflow as tf

from keras_reformer.ops.chunk_attention import (
    GROUP_ELEMENTS,
    bias_from_masks,
    dropout_keep,
    rows_attention,
)

# Above this many buckets the (D x buckets/2) projection costs more than the
# chunked attention itself (2 * C keys per query at C = 64), so derived bucket
# counts are factorized into two hashes of about sqrt(buckets) each.
DEFAULT_FACTORIZE_ABOVE = 256


def derived_num_buckets(padded_length, bucket_size):
    """Bucket count used when `num_buckets=None`: 2 * length / bucket_size.

    Gives buckets of about bucket_size / 2 positions, so a bucket rarely
    spills over a chunk (the paper's choice). Always even and at least 2.
    Works on python ints and on scalar tensors (dynamic lengths).
    """
    if isinstance(padded_length, int):
        return max(2, 2 * (padded_length // bucket_size))
    return tf.maximum(2, 2 * (padded_length // bucket_size))


def factor_num_buckets(num_buckets):
    """Split an even bucket count into two even factors with product >= it."""
    if isinstance(num_buckets, int):
        first = 2 * math.ceil(math.sqrt(num_buckets) / 2)
        second = 2 * math.ceil(num_buckets / first / 2)
        return first, second
    n = tf.cast(num_buckets, tf.float32)
    first = 2 * tf.cast(tf.math.ceil(tf.sqrt(n) / 2), tf.int32)
    second = 2 * tf.cast(
        tf.math.ceil(n / tf.cast(first, tf.float32) / 2), tf.int32
    )
    return first, second


def hash_vectors(vectors, rotations):
    """Angular LSH: bucket = argmax([xR; -xR]), one or two (factorized) hashes.

    Args:
        vectors: (B, H, L, D) float32.
        rotations: list of one or two (D, R, n_i / 2) float32 tensors.

    Returns:
        (B, H, R, L) int32 bucket ids in [0, prod(n_i)).
    """
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
    length = tf.shape(buckets)[-1]
    buckets = tf.where(valid[:, None, None, :], buckets, num_buckets)
    # int64 keys: (num_buckets + 1) * L overflows int32 beyond ~256K tokens.
    key = tf.cast(buckets, tf.int64) * tf.cast(length, tf.int64) + tf.range(
        length, dtype=tf.int64
    )
    order = tf.argsort(key, axis=-1)
    inverse = tf.argsort(order, axis=-1)
    sorted_buckets = tf.gather(buckets, order, axis=3, batch_dims=3)
    return tf.cast(order, tf.int32), tf.cast(inverse, tf.int32), sorted_buckets


def gather_rounds(x, order, inverse):
    """x (B, H, L, ...) -> (B, H, R, L, ...) in each round's sorted order.

    The gradient of a gather is a scatter-add, slow on CPU; since `order` is
    a permutation, the gradient is a gather by its inverse, summed over rounds.
    (The permutations are arguments, not closures, so that TF's custom-gradient
    check does not trace them back to the projection weights.)
    """

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            back = tf.gather(upstream, inverse, axis=3, batch_dims=3)
            return tf.reduce_sum(back, axis=2), None, None

        return tf.gather(x, order, axis=2, batch_dims=2), grad

    return forward(x, order, inverse)


def unsort_rounds(x, order, inverse):
    """x (B, H, R, L, ...) in sorted order -> original order; gradient by gather."""

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            return tf.gather(upstream, order, axis=3, batch_dims=3), None, None

        return tf.gather(x, inverse, axis=3, batch_dims=3), grad

    return forward(x, order, inverse)


def _unit(vectors):
    """Keys are the unit-normalised queries (shared QK)."""
    return vectors * tf.math.rsqrt(
        tf.maximum(tf.reduce_sum(tf.square(vectors), -1, keepdims=True), 1e-12)
    )


def window_covers_all(num_chunks, chunks_before, chunks_after, causal):
    """True when every query's chunk window already spans the whole input.

    Then LSH attention is full attention, computed densely (exactly, and
    cheaper than hashing). Works on python ints and scalar tensors.
    """
    reach = chunks_before if causal else min(chunks_before, chunks_after)
    return num_chunks - 1 <= reach


def dense_attend(qk, values, valid, *, causal=False, pair_allowed=None,
                 dropout_rate=0.0, dropout_seed=None):
    """Plain shared-QK softmax attention, (B, H, L, E), for short inputs."""
    scale = 1.0 / math.sqrt(float(qk.shape[-1]))
    logits = tf.matmul(qk, _unit(qk), transpose_b=True) * scale  # (B,H,L,L)
    positions = tf.range(tf.shape(qk)[2])
    masked = tf.logical_not(valid)[:, None, None, :]
    if causal:
        masked = tf.logical_or(masked, positions[None, :] > positions[:, None])
    if pair_allowed is not None:
        masked = tf.logical_or(masked, tf.logical_not(pair_allowed)[:, None])
    same = positions[:, None] == positions[None, :]
    probs = tf.nn.softmax(logits + bias_from_masks(same, masked), axis=-1)
    if dropout_rate > 0:
        probs = probs * dropout_keep(tf.shape(probs), dropout_rate, dropout_seed)
    return tf.matmul(probs, values)


def lsh_attend(qk, values, buckets, num_buckets, valid, *, bucket_size,
               chunks_before=1, chunks_after=0, causal=False,
               pair_allowed=None, dropout_rate=0.0, dropout_seed=None,
               group_elements=GROUP_ELEMENTS):
    """Chunked attention within sorted buckets, rounds combined by logsumexp.

    Args:
        qk: (B, H, L, D) float32 shared query/key vectors; L % C == 0.
        values: (B, H, L, E) float32.
        buckets: (B, H, R, L) int32 from `hash_vectors`.
        num_buckets: int or int32 scalar tensor.
        valid: (B, L) bool; False marks padding (masked as keys everywhere).
        bucket_size: C, the chunk length.
        chunks_before, chunks_after: chunks each chunk also attends to.
        causal: mask keys at later original positions; a causal query sees
            only keys of its own bucket at most `chunks_before * C` sorted
            slots back, so its output never depends on later tokens.
        pair_allowed: optional (B, L, L) bool mask of allowed (query, key).
        dropout_rate, dropout_seed: attention dropout and its (2,) int32 seed.
        group_elements: logits computed at once (bounds memory, see
            `chunk_attention`).

    Returns:
        (B, H, L, E) float32 attention output.
    """
    batch, heads = tf.shape(qk)[0], qk.shape[1]
    length = tf.shape(qk)[2]
    rounds = buckets.shape[2]
    order, inverse, sorted_buckets = sort_order(buckets, valid, num_buckets)

    def rows(x):
        """(B, H, R, L, ...) -> (B * H * R, L / C, C, ...)."""
        shape = tf.shape(x)
        tail = x.shape[4:].as_list()
        static = [None if qk.shape[0] is None else qk.shape[0] * heads * rounds]
        x = tf.reshape(
            x, tf.concat([[-1, shape[3] // bucket_size, bucket_size], shape[4:]], 0)
        )
        chunks = None if qk.shape[2] is None else qk.shape[2] // bucket_size
        return tf.ensure_shape(x, static + [chunks, bucket_size] + tail)

    batch_index = tf.broadcast_to(
        tf.range(batch)[:, None, None, None], tf.shape(order)
    )
    info = {
        "position": rows(order),
        "bucket": rows(sorted_buckets),
        "slot": rows(tf.broadcast_to(tf.range(length), tf.shape(order))),
        "valid": rows(tf.gather(valid, order, axis=1, batch_dims=1)),
        "batch": rows(batch_index),
    }
    flat_pair = None
    if pair_allowed is not None:
        flat_pair = tf.reshape(pair_allowed, [batch, -1])
    out, lse = rows_attention(
        rows(gather_rounds(qk, order, inverse)),
        rows(gather_rounds(values, order, inverse)),
        info,
        window=(chunks_before, chunks_after),
        causal=causal,
        length=length,
        pair_allowed=flat_pair,
        rate=dropout_rate,
        seed=dropout_seed,
        budget=group_elements,
    )

    # Back to (B, H, R, L, ...) in original order, then weight the rounds by
    # their share of the total softmax mass: softmax over R of the lse.
    out = tf.reshape(out, [batch, heads, rounds, length, values.shape[-1]])
    lse = tf.reshape(lse, [batch, heads, rounds, length])
    out = unsort_rounds(out, order, inverse)
    lse = unsort_rounds(lse, order, inverse)
    weights = tf.nn.softmax(lse, axis=2)
    return tf.reduce_sum(out * weights[..., None], axis=2)
