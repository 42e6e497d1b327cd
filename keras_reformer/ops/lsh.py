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

# A key that is masked gets MASK_VALUE; a query's own key gets the much milder
# SELF_MASK_VALUE so that a query with nothing else to attend to still has a
# defined softmax (it attends to itself). Logits are float32, where both fit.
MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5

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


def look_around(chunks, before, after, pad_value):
    """Concatenate each chunk with `before` previous and `after` next chunks.

    Chunks outside the round are filled with `pad_value` (they never wrap
    into another round or the other end of this one).

    Args:
        chunks: (B, H, R, N, C, ...) tensor.

    Returns:
        (B, H, R, N, (before + 1 + after) * C, ...) tensor.
    """
    if before == 0 and after == 0:
        return chunks
    rank = len(chunks.shape)
    paddings = [[0, 0]] * 3 + [[before, after]] + [[0, 0]] * (rank - 4)
    padded = tf.pad(chunks, paddings, constant_values=pad_value)
    count = tf.shape(chunks)[3]
    parts = [padded[:, :, :, i : i + count] for i in range(before + 1 + after)]
    return tf.concat(parts, axis=4)


def _chunk(x, bucket_size):
    """(B, H, R, L, ...) -> (B, H, R, L / C, C, ...)."""
    shape = tf.shape(x)
    new_shape = tf.concat(
        [shape[:3], [shape[3] // bucket_size, bucket_size], shape[4:]], axis=0
    )
    return tf.reshape(x, new_shape)


def chunked_attention_logits(queries, keys, query, key, causal, reach,
                             pair_allowed, length):
    """Masked, scaled logits of each chunk against its window (float32).

    Args:
        queries: (B, H, R, N, C, D); keys: (B, H, R, N, W, D), unit-normalised.
        query: dict of (B, H, R, N, C) int32 tensors for the query slots:
            "position" (original position), "bucket", "slot" (sorted index).
        key: the same for the key window, (B, H, R, N, W), plus "valid"
            (bool); slots outside the round have valid False, slot -1.
        causal: python bool.
        reach: how many sorted slots back a causal query may look.
        pair_allowed: None or (B, L, L) bool, an explicit attention mask.
        length: scalar, L (for indexing `pair_allowed`).
    """
    scale = 1.0 / math.sqrt(float(queries.shape[-1]))
    logits = tf.matmul(queries, keys, transpose_b=True) * scale
    q_pos = query["position"][..., :, None]
    k_pos = key["position"][..., None, :]
    masked = tf.logical_not(key["valid"])[..., None, :]
    if causal:
        # Chunk boundaries move with the buckets of later tokens, so a causal
        # query that saw "its chunk and the one before" would see a key set
        # that depends on the future. Instead it sees the `reach` most recent
        # keys of its own bucket: a set fixed by the tokens up to it.
        q_slot = query["slot"][..., :, None]
        k_slot = key["slot"][..., None, :]
        masked = tf.logical_or(masked, k_pos > q_pos)
        masked = tf.logical_or(masked, q_slot - k_slot > reach)
        masked = tf.logical_or(
            masked, query["bucket"][..., :, None] != key["bucket"][..., None, :]
        )
    if pair_allowed is not None:
        batch = tf.shape(pair_allowed)[0]
        flat = tf.reshape(pair_allowed, [batch, -1])
        index = q_pos * length + tf.maximum(k_pos, 0)
        allowed = tf.gather(
            flat, tf.reshape(index, [batch, -1]), batch_dims=1
        )
        masked = tf.logical_or(
            masked, tf.logical_not(tf.reshape(allowed, tf.shape(index)))
        )
    return _mask_logits(logits, q_pos == k_pos, masked)


def _mask_logits(logits, same_position, masked):
    logits = tf.where(same_position, SELF_MASK_VALUE, logits)
    return tf.where(masked, MASK_VALUE, logits)


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
                 dropout=None):
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
    probs = tf.nn.softmax(_mask_logits(logits, same, masked), axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return tf.matmul(probs, values)


def lsh_attend(qk, values, buckets, num_buckets, valid, *, bucket_size,
               chunks_before=1, chunks_after=0, causal=False,
               pair_allowed=None, dropout=None):
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
        dropout: optional callable applied to attention probabilities.

    Returns:
        (B, H, L, E) float32 attention output.
    """
    length = tf.shape(qk)[2]
    order, inverse, sorted_buckets = sort_order(buckets, valid, num_buckets)

    keys = _unit(qk)
    sorted_q = _chunk(tf.gather(qk, order, axis=2, batch_dims=2), bucket_size)
    sorted_k = _chunk(tf.gather(keys, order, axis=2, batch_dims=2), bucket_size)
    sorted_v = _chunk(
        tf.gather(values, order, axis=2, batch_dims=2), bucket_size
    )
    slots = tf.broadcast_to(tf.range(length), tf.shape(order))
    query = {
        "position": _chunk(order, bucket_size),
        "bucket": _chunk(sorted_buckets, bucket_size),
        "slot": _chunk(slots, bucket_size),
        "valid": _chunk(
            tf.gather(valid, order, axis=1, batch_dims=1), bucket_size
        ),
    }
    window = (chunks_before, chunks_after)
    pads = {"position": -1, "bucket": -1, "slot": -1, "valid": False}
    key = {
        name: look_around(value, *window, pads[name])
        for name, value in query.items()
    }
    logits = chunked_attention_logits(
        sorted_q,
        look_around(sorted_k, *window, 0.0),
        query,
        key,
        causal,
        chunks_before * bucket_size,
        pair_allowed,
        length,
    )
    lse = tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
    probs = tf.exp(logits - lse)
    if dropout is not None:
        probs = dropout(probs)
    out = tf.matmul(probs, look_around(sorted_v, *window, 0.0))

    # Back to (B, H, R, L, ...) in original order, then weight the rounds by
    # their share of the total softmax mass: softmax over R of the lse.
    shape = tf.shape(out)
    out = tf.reshape(out, [shape[0], shape[1], shape[2], length, shape[-1]])
    lse = tf.reshape(lse, [shape[0], shape[1], shape[2], length])
    out = tf.gather(out, inverse, axis=3, batch_dims=3)
    lse = tf.gather(lse, inverse, axis=3, batch_dims=3)
    weights = tf.nn.softmax(lse, axis=2)
    return tf.reduce_sum(out * weights[..., None], axis=2)
