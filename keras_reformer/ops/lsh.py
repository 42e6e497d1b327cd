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


def look_around(chunks, before, after, pad_value=None):
    """Concatenate each chunk with `before` previous and `after` next chunks.

    Built from `tf.roll`, whose gradient is another roll (slicing a padded
    copy instead made StridedSliceGrad the costliest op of the backward
    pass). Rolling wraps around the round; with `pad_value` the wrapped-in
    chunks are overwritten with it. Float tensors (keys, values) need no pad:
    the mask built from the padded integer tensors hides those slots.

    Args:
        chunks: (B, H, R, N, C, ...) tensor.

    Returns:
        (B, H, R, N, (before + 1 + after) * C, ...) tensor.
    """
    if before == 0 and after == 0:
        return chunks
    count = tf.shape(chunks)[3]
    index = tf.range(count)
    trailing = [1] * (len(chunks.shape) - 4)
    parts = []
    for offset in range(-before, after + 1):
        part = chunks if offset == 0 else tf.roll(chunks, -offset, axis=3)
        if pad_value is not None and offset != 0:
            inside = tf.logical_and(index + offset >= 0, index + offset < count)
            inside = tf.reshape(inside, [1, 1, 1, count] + trailing)
            part = tf.where(inside, part, tf.cast(pad_value, chunks.dtype))
        parts.append(part)
    return tf.concat(parts, axis=4)


def _chunk(x, bucket_size):
    """(B, H, R, L, ...) -> (B, H, R, L / C, C, ...)."""
    shape = tf.shape(x)
    new_shape = tf.concat(
        [shape[:3], [shape[3] // bucket_size, bucket_size], shape[4:]], axis=0
    )
    return tf.reshape(x, new_shape)


def chunk_bias(query, key, causal, reach, pair_allowed, length):
    """Additive float32 mask of each chunk's queries against its key window.

    0 where attention is allowed, SELF_MASK_VALUE on a query's own key,
    MASK_VALUE where masked. Built from integer positions only, so it needs
    no gradient; adding it instead of `tf.where` on the logits keeps the
    backward pass to a plain pass-through. (A logit plus -1e9 rounds to -1e9
    in float32, so adding equals overwriting.)

    Args:
        query: dict of (B, H, R, N, C) int32 tensors for the query slots:
            "position" (original position), "bucket", "slot" (sorted index).
        key: the same for the key window, (B, H, R, N, W), plus "valid"
            (bool); slots outside the round have bucket and slot -1.
        causal: python bool.
        reach: how many sorted slots back a causal query may look.
        pair_allowed: None or (B, L, L) bool, an explicit attention mask.
        length: scalar, L (for indexing `pair_allowed`).
    """
    q_pos = query["position"][..., :, None]
    k_pos = key["position"][..., None, :]
    if causal:
        # Chunk boundaries move with the buckets of later tokens, so a causal
        # query that saw "its chunk and the one before" would see a key set
        # that depends on the future. Instead it sees the `reach` most recent
        # keys of its own bucket: a set fixed by the tokens up to it. Within a
        # bucket sorted order is position order, so slot distance in
        # [0, reach] is "earlier and recent". Padding has a bucket of its own,
        # so the bucket test also masks padding keys for real queries.
        back = query["slot"][..., :, None] - key["slot"][..., None, :]
        masked = tf.logical_or(
            tf.cast(back, tf.uint32) > reach,  # negative wraps: later keys
            query["bucket"][..., :, None] != key["bucket"][..., None, :],
        )
    else:
        masked = tf.logical_not(key["valid"])[..., None, :]
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
    return _bias(q_pos == k_pos, masked)


def chunk_attention(queries, keys, values, bias, keep=None):
    """Softmax attention of each chunk over its window, with a hand-written
    gradient.

    Autodiff through `exp(logits - logsumexp(logits))` keeps several
    (C x W)-sized intermediates and runs a dozen elementwise passes over them
    backward; the gradient below needs the saved probabilities and two:
    `ds = p * (dp - delta)`, as in FlashAttention's backward, with the
    logsumexp's own gradient folded into `delta`.

    Args:
        queries: (..., C, D), already scaled by 1 / sqrt(D).
        keys: (..., W, D); values: (..., W, E).
        bias: (..., C, W) additive mask (no gradient).
        keep: optional (..., C, W) dropout multiplier, 0 or 1 / (1 - rate).

    Returns:
        out (..., C, E) and lse (..., C, 1), the log of each row's normaliser.
    """

    @tf.custom_gradient
    def attend(q, k, v, bias, keep):
        logits = tf.matmul(q, k, transpose_b=True) + bias
        lse = tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
        probs = tf.exp(logits - lse)
        dropped = keep.shape.rank != 1
        kept = probs * keep if dropped else probs
        out = tf.matmul(kept, v)

        def grad(d_out, d_lse):
            d_v = tf.matmul(kept, d_out, transpose_a=True)
            d_probs = tf.matmul(d_out, v, transpose_b=True)
            if dropped:
                d_probs = d_probs * keep
            delta = tf.reduce_sum(d_out * out, axis=-1, keepdims=True)
            if d_lse is not None:
                delta = delta - d_lse
            d_logits = probs * (d_probs - delta)
            return (
                tf.matmul(d_logits, k),
                tf.matmul(d_logits, q, transpose_a=True),
                d_v,
                None,
                None,
            )

        return (out, lse), grad

    if keep is None:
        # An empty stand-in: custom_gradient takes tensors only.
        return attend(queries, keys, values, bias, tf.zeros([0]))
    return attend(queries, keys, values, bias, keep)


def _bias(same_position, masked):
    self_bias = tf.where(same_position, SELF_MASK_VALUE, 0.0)
    return tf.where(masked, MASK_VALUE, self_bias)


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
    probs = tf.nn.softmax(logits + _bias(same, masked), axis=-1)
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
        dropout: optional callable applied to attention probabilities (it
            is applied to a tensor of ones to get the dropout multiplier).

    Returns:
        (B, H, L, E) float32 attention output.
    """
    length = tf.shape(qk)[2]
    order, inverse, sorted_buckets = sort_order(buckets, valid, num_buckets)

    width = qk.shape[-1]
    sorted_q = _chunk(gather_rounds(qk, order, inverse), bucket_size)
    sorted_k = _chunk(gather_rounds(_unit(qk), order, inverse), bucket_size)
    sorted_v = _chunk(gather_rounds(values, order, inverse), bucket_size)
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
    bias = chunk_bias(
        query, key, causal, chunks_before * bucket_size, pair_allowed, length
    )
    out, lse = chunk_attention(
        sorted_q * (1.0 / math.sqrt(float(width))),
        look_around(sorted_k, *window),
        look_around(sorted_v, *window),
        bias,
        keep=None if dropout is None else dropout(tf.ones_like(bias)),
    )

    # Back to (B, H, R, L, ...) in original order, then weight the rounds by
    # their share of the total softmax mass: softmax over R of the lse.
    shape = tf.shape(out)
    out = tf.reshape(out, [shape[0], shape[1], shape[2], length, shape[-1]])
    lse = tf.reshape(lse, [shape[0], shape[1], shape[2], length])
    out = unsort_rounds(out, order, inverse)
    lse = unsort_rounds(lse, order, inverse)
    weights = tf.nn.softmax(lse, axis=2)
    return tf.reduce_sum(out * weights[..., None], axis=2)
