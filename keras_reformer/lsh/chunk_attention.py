"""Attention of sorted chunks over their windows, in bounded memory.

Rows are the (batch, head, round) triples of LSH attention, each a sorted
sequence cut into N chunks of C slots. Every chunk attends to a window
of W = C * (before + 1 + after) slots. The (C x W) logits of all rows at once
take `rows * L * W` floats (at 64K tokens, 4 heads and 2 rounds: 268 MB per
tensor, several alive at once), so long inputs are processed a group of (batch,
head) pairs at a time, from sorting to the combination of the rounds, in a
`tf.while_loop` whose gradient recomputes each group instead of keeping its
intermediates: memory stays at one group's worth, forward and backward,
whatever the length.
"""

import math

import tensorflow as tf

from keras_reformer.ops.permute import gather_rounds, unsort_rounds

# A key that is masked gets MASK_VALUE; a query's own key gets the much milder
# SELF_MASK_VALUE so that a query with nothing else to attend to still has a
# defined softmax (it attends to itself). Logits are float32, where both fit.
MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5

# Logit elements per group of rows (2^20 float32 = 4 MiB per (C x W) tensor).
# Smaller groups are cheaper, not dearer, although each is recomputed in the
# backward pass: with one (batch, head) pair per group instead of all four,
# the reference model's step at 4K ran at 7,770 instead of 7,000 tokens/s
# in 948 instead of 1,028 MiB, and at 16K in 1,270 instead of 1,570 MiB at
# the same speed (benchmarks/train_step.py points, 2^20 against 2^22-2^23).
GROUP_ELEMENTS = 2**20

INFO_PADS = {"position": -1, "bucket": -1, "valid": False}


def look_around(chunks, before, after, pad_value=None):
    """Concatenate each chunk with `before` previous and `after` next chunks.

    Built from `tf.roll`, whose gradient is another roll (slicing a padded
    copy instead made StridedSliceGrad the costliest op of the backward
    pass). Rolling wraps around the row; with `pad_value` the wrapped-in
    chunks are overwritten with it. Float tensors (keys, values) need no pad:
    the mask built from the padded integer tensors hides those slots.

    Args:
        chunks: (rows, N, C, ...) tensor.

    Returns:
        (rows, N, (before + 1 + after) * C, ...) tensor.
    """
    if before == 0 and after == 0:
        return chunks
    count = tf.shape(chunks)[1]
    index = tf.range(count)
    trailing = [1] * (len(chunks.shape) - 2)
    parts = []
    for offset in range(-before, after + 1):
        part = chunks if offset == 0 else tf.roll(chunks, -offset, axis=1)
        if pad_value is not None and offset != 0:
            inside = tf.logical_and(index + offset >= 0, index + offset < count)
            inside = tf.reshape(inside, [1, count] + trailing)
            part = tf.where(inside, part, tf.cast(pad_value, chunks.dtype))
        parts.append(part)
    return tf.concat(parts, axis=2)


def bias_from_masks(same_position, masked, dtype=tf.float32):
    """Additive mask: 0, SELF_MASK_VALUE on self, MASK_VALUE where masked.

    Adding it equals overwriting: a logit plus -1e9 rounds to -1e9 in
    float32. Built from integers only, so it needs no gradient. The two
    masks broadcast against each other.
    """
    self_bias = tf.where(same_position, tf.constant(SELF_MASK_VALUE, dtype),
                         tf.constant(0.0, dtype))
    return tf.where(masked, tf.constant(MASK_VALUE, dtype), self_bias)


def window_back(size, width, before):
    """(C, W) int32: how many sorted slots each query of a chunk lies after
    each key of its window; the same for every chunk.

    The window is the chunks `before` back to `after` ahead, in order, so
    key w of chunk n holds slot (n - before) * C + w and query c slot
    n * C + c. Keys that wrapped in from the other end of the row (the
    first chunks' look-back) do not follow this layout; every mask that
    uses it also tests their padded bucket (-1), which never matches.
    """
    return before * size + tf.range(size)[:, None] - tf.range(width)[None, :]


def chunk_bias(query, key, causal, before, pair_rows, length, row_causal=None,
               sliding_window=None, dtype=tf.float32, strict=False):
    """Additive mask of each chunk's queries against its key window.

    Args:
        query: dict of (rows, N, C) tensors for the query slots: "position"
            (original position), "bucket", "valid".
        key: the same for the key window, (rows, N, W); slots outside the
            row have position and bucket -1 and valid False.
        causal: python bool, the causal rule for every row.
        before: chunks the window reaches back; a causal query may look
            `before * C` sorted slots back.
        pair_rows: None or (rows, L * L) bool explicit attention masks.
        length: scalar, L (for indexing `pair_rows`).
        row_causal: None or (rows,) bool: rows that follow the causal rule
            although `causal` is False (their explicit mask admits no later
            key, so they must not see the future through the chunk windows).
        sliding_window: None or int: keys with |query - key| >= it are masked.
        strict: causal queries never see themselves (shifted values: the
            key at j brings the value after j, so the self key would bring
            the query's own future).

    Returns:
        (rows, N, C, W) float32.
    """
    size, width = query["bucket"].shape[-1], key["bucket"].shape[-1]
    # Slot distances and the query's own key follow from the window's
    # layout alone: (C, W) tables instead of two (rows, N, C, W) integer
    # tensors (64 MiB each per (batch, head) pair at 64K tokens). Positions
    # are unique within a row, so "same position" is "distance 0".
    back = window_back(size, width, before)
    own = tf.equal(back, 0)

    # Chunk boundaries move with the buckets of later tokens, so a causal
    # query that saw "its chunk and the one before" would see a key set that
    # depends on the future. Instead it sees the `before * C` most recent
    # keys of its own bucket: a set fixed by the tokens up to it. Within a
    # bucket sorted order is position order, so slot distance in
    # [0, before * C] is "earlier and recent". Padding has a bucket of its
    # own, so the bucket test also masks padding keys for real queries, and
    # wrapped-in keys (bucket -1) for all.
    def causal_masked():
        far = tf.logical_or(back < 0, back > before * size)
        if strict:
            far = tf.logical_or(far, own)
        return tf.logical_or(
            far, query["bucket"][..., :, None] != key["bucket"][..., None, :]
        )

    if causal:
        masked = causal_masked()
    else:
        masked = tf.logical_not(key["valid"])[..., None, :]
        if row_causal is not None:
            masked = tf.where(
                row_causal[:, None, None, None], causal_masked(), masked
            )
    if sliding_window is not None or pair_rows is not None:
        q_pos = query["position"][..., :, None]
        k_pos = key["position"][..., None, :]
    if sliding_window is not None:
        masked = tf.logical_or(masked, tf.abs(q_pos - k_pos) >= sliding_window)
    if pair_rows is not None:
        rows = tf.shape(pair_rows)[0]
        index = q_pos * length + tf.maximum(k_pos, 0)
        allowed = tf.gather(pair_rows, tf.reshape(index, [rows, -1]), batch_dims=1)
        masked = tf.logical_or(
            masked, tf.logical_not(tf.reshape(allowed, tf.shape(index)))
        )
    return bias_from_masks(own, masked, dtype)


def dropout_keep(shape, rate, seed, dtype=tf.float32):
    """Dropout multiplier (0 or 1 / (1 - rate)) from a stateless seed, so the
    same seed gives the same mask in a recomputation."""
    uniform = tf.random.stateless_uniform(shape, seed=seed)
    return tf.cast(uniform >= rate, dtype) * (1.0 / (1.0 - rate))


def softmax_attention(queries, keys, values, bias, keep=None):
    """Softmax attention with a hand-written gradient; returns out and lse.

    Autodiff through `exp(logits - logsumexp(logits))` keeps several
    (C x W)-sized intermediates and runs a dozen elementwise passes over them
    backward; the gradient below needs the saved probabilities and two:
    `ds = p * (dp - delta)`, as in FlashAttention's backward, with the
    logsumexp's own gradient folded into `delta`. The mask and dropout are
    arguments, not closures, so that TF's custom-gradient check does not
    trace them back to the projection weights.

    Args:
        queries: (..., C, D), already scaled by 1 / sqrt(D).
        keys: (..., W, D); values: (..., W, E).
        bias: (..., C, W) additive mask (no gradient).
        keep: optional (..., C, W) dropout multiplier.

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
            with tf.name_scope("chunk_attention_grad"):  # the profile's category
                return _grad(d_out, d_lse)

        def _grad(d_out, d_lse):
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
        keep = tf.zeros([0])  # an empty stand-in: custom_gradient takes tensors
    return attend(queries, keys, values, bias, keep)


def _unit(vectors):
    """Keys are the unit-normalised queries (shared QK)."""
    return vectors * tf.math.rsqrt(
        tf.maximum(tf.reduce_sum(tf.square(vectors), -1, keepdims=True), 1e-12)
    )


def _attend_group(q, v, info, group_index, settings):
    """One group of rows: keys, windows, mask, dropout, attention -> out, lse.

    Keys are derived from the sorted queries here rather than gathered, so
    that no full-length copy of them is kept for the backward pass.
    """
    before, after = settings["window"]
    key = {
        name: look_around(info[name], before, after, pad)
        for name, pad in INFO_PADS.items()
    }
    pair_rows = row_causal = None
    mask_row = info["mask_row"][:, 0, 0]
    if settings["pair_allowed"] is not None:
        pair_rows = tf.gather(settings["pair_allowed"], mask_row)
    if settings["row_causal"] is not None:
        row_causal = tf.gather(settings["row_causal"], mask_row)
    bias = chunk_bias(
        info, key, settings["causal"], before, pair_rows, settings["length"],
        row_causal=row_causal,
        sliding_window=settings["sliding_window"], dtype=q.dtype,
        strict=settings["strict"],
    )
    keep = None
    if settings["rate"] > 0:
        # Folding the group index into the step's seed gives every group
        # (and, with a fresh step seed, every step) an independent mask;
        # `seed + [0, g]` made group g of one step reuse group 0's mask of
        # a later step.
        seed = tf.random.experimental.stateless_fold_in(
            settings["seed"], group_index
        )
        keep = dropout_keep(tf.shape(bias), settings["rate"], seed, q.dtype)
    out, lse = softmax_attention(
        q * (1.0 / math.sqrt(float(q.shape[-1]))),
        look_around(_unit(q), before, after),
        look_around(v, before, after),
        bias,
        keep,
    )
    return out, lse[..., 0]


def group_size(count, item_elements, budget=GROUP_ELEMENTS):
    """Largest divisor g of `count` with g * item_elements <= budget (>= 1)."""
    best = 1
    for g in range(1, count + 1):
        if count % g == 0 and g * item_elements <= budget:
            best = g
    return best


def _attend_rounds(qk, v, ints, group_index, settings):
    """Attention of a group of (batch, head) pairs in the rounds of `ints`,
    each round's output and logsumexp back in original order.

    Sorting, chunked attention and unsorting all happen here, so only
    (pairs, rounds, L, width) tensors leave a group: nothing of size
    rounds x L x window is kept for backward.

    Args:
        qk: (g, L, D) queries; v: (g, L, E) values.
        ints: dict of "order", "inverse", "bucket" (g, R, L) int32 (sorted
            slot -> position, its inverse, the bucket at each sorted slot),
            "valid" (g, L) bool, "mask_row" (g,) int32: the row of the
            explicit masks (`pair_allowed`, `row_causal`) for the pair.
        group_index: scalar, numbers the dropout seed of the group.

    Returns:
        out (g, R, L, E) and lse (g, R, L), float32.
    """
    order, inverse = ints["order"], ints["inverse"]
    pairs, rounds, length = tf.shape(order)[0], order.shape[1], tf.shape(order)[2]
    size = settings["bucket_size"]

    def rows(x):
        """(g, R, L, ...) -> (g * R, L / C, C, ...)."""
        tail = tf.shape(x)[3:]
        return tf.reshape(x, tf.concat([[-1, length // size, size], tail], 0))

    info = {
        "position": rows(order),
        "bucket": rows(ints["bucket"]),
        "valid": rows(tf.gather(ints["valid"], order, axis=1, batch_dims=1)),
        "mask_row": rows(
            tf.broadcast_to(ints["mask_row"][:, None, None], tf.shape(order))
        ),
    }
    sorted_qk = rows(gather_rounds(qk, order, inverse))
    sorted_v = rows(gather_rounds(v, order, inverse))
    with tf.name_scope("chunk_attention"):  # scopes name the profile's categories
        out, lse = _attend_group(sorted_qk, sorted_v, info, group_index, settings)
    out = unsort_rounds(
        tf.reshape(out, [pairs, rounds, length, v.shape[-1]]), order, inverse
    )
    lse = unsort_rounds(tf.reshape(lse, [pairs, rounds, length]), order, inverse)
    return out, lse


def _attend_pairs(qk, v, ints, group_index, settings):
    """`_attend_rounds`, the rounds combined: (g, L, E)."""
    out, lse = _attend_rounds(qk, v, ints, group_index, settings)
    # Each round weighs by its share of the total softmax mass.
    with tf.name_scope("lsh_combine"):
        return combine_rounds(out, lse, axis=1, strict=settings["strict"])


def combine_rounds(out, lse, axis, strict=False):
    """The rounds' outputs `out` (rounds on `axis`, features last) weighed by
    their share of the total softmax mass, `lse` (`out`'s shape without the
    features). With `strict`, a query with no allowed key in any round (the
    first of its bucket in each) has only masked logits: its softmax spreads
    over the window, future included, so its output is zero instead."""
    weights = tf.nn.softmax(lse, axis=axis)
    combined = tf.reduce_sum(out * weights[..., None], axis=axis)
    return zero_without_key(combined, lse, axis) if strict else combined


def zero_without_key(combined, lse, axis):
    """`combined` with zeros for the queries whose logsumexp `lse` is masked
    in every round (rounds on `axis`): the strict rule's "no key, no output"."""
    has_key = tf.reduce_max(lse, axis=axis) > 0.5 * MASK_VALUE
    return combined * tf.cast(has_key, combined.dtype)[..., None]


def pairs_attention(qk, v, ints, *, bucket_size, window, causal, length,
                    pair_allowed=None, row_causal=None, sliding_window=None,
                    rate=0.0, seed=None, budget=GROUP_ELEMENTS, strict=False):
    """LSH attention of every (batch, head) pair; a loop over groups if large.

    Args:
        qk: (P, L, D) float queries (keys are their unit vectors); float32
            in the layer, float64 in gradient tests.
        v: (P, L, E) values, same dtype.
        ints: see `_attend_rounds` (for all P pairs).
        bucket_size: C; window: (chunks_before, chunks_after); causal: bool.
        length: scalar L.
        pair_allowed: None or (M, L * L) bool explicit masks, M mask rows
            (indexed by ints["mask_row"]).
        row_causal: None or (M,) bool, mask rows that follow the causal rule.
        sliding_window: None or int, the largest |query - key| + 1 allowed.
        rate, seed: attention dropout rate and a (2,) int32 seed.
        budget: logit elements per group (the memory knob).
        strict: see `chunk_bias`; queries with no allowed key output zeros.

    Returns:
        (P, L, E) float32.
    """
    settings = dict(window=window, causal=causal, length=length, strict=strict,
                    pair_allowed=pair_allowed, row_causal=row_causal,
                    sliding_window=sliding_window, rate=rate, seed=seed,
                    bucket_size=bucket_size)
    count, rounds, positions = qk.shape[0], ints["order"].shape[1], qk.shape[1]
    if count is None or positions is None or rounds is None:
        return _attend_pairs(qk, v, ints, 0, settings)
    width = bucket_size * (window[0] + 1 + window[1])
    group = group_size(count, rounds * positions * width, budget)
    if group == count:
        # Everything fits at once: autodiff keeps the probabilities.
        return _attend_pairs(qk, v, ints, 0, settings)

    if group == 1 and rounds > 1 and rounds * positions * width > budget:
        # One pair's rounds do not fit at once (64K tokens and beyond with
        # the default budget): one (pair, round) at a time.
        return _loop_rounds(qk, v, ints, settings)
    return _loop_pairs(qk, v, ints, settings, group)


def _loop_pairs(qk, v, ints, settings, group):
    """`_attend_pairs` over groups of `group` pairs in a loop whose gradient
    recomputes each group instead of keeping its intermediates."""
    count, positions = qk.shape[0], qk.shape[1]
    groups = count // group
    names = sorted(ints)

    def split(x):
        return tf.reshape(x, [groups, group] + x.shape[1:].as_list())

    def group_inputs(index, qk, v, values):
        """Group `index`'s slices of the loop's inputs."""
        part = [tf.gather(x, index) for x in (qk, v, *values)]
        return part[0], part[1], dict(zip(names, part[2:]))

    @tf.custom_gradient
    def looped(qk, v, *values):
        (out,) = over_groups(
            lambda i: (_attend_pairs(*group_inputs(i, qk, v, values), i, settings),),
            groups, [_spec(v)])

        def grad(d_out):
            def group_grad(index):
                q, w, part = group_inputs(index, qk, v, values)
                with tf.GradientTape() as tape:
                    tape.watch([q, w])
                    out = _attend_pairs(q, w, part, index, settings)
                # d_out enters the recomputation's gradient, so XLA cannot
                # hoist the recomputation into the forward pass.
                return tuple(tape.gradient(out, [q, w], tf.gather(d_out, index)))

            # `after`: in a reversible backward pass the forward loop above
            # has just been rerun to recompute the block's output; nothing
            # else orders the two loops, and run side by side they hold two
            # groups' logits at once.
            grads = over_groups(group_grad, groups, [_spec(qk), _spec(v)],
                                after=[out])
            return list(grads) + [None] * len(values)

        return out, grad

    out = looped(split(qk), split(v), *[split(ints[n]) for n in names])
    return tf.reshape(out, [count, positions, v.shape[-1]])


def _loop_rounds(qk, v, ints, settings):
    """`_attend_pairs` one (pair, round) at a time, in a loop whose gradient
    recomputes each round instead of keeping its intermediates.

    The rounds of a pair are combined as they come (a running logsumexp),
    so besides one round's logits only the combined output and each round's
    logsumexp (P, R, L) are kept: no (P, R, L, E) tensor of all rounds'
    outputs exists, forward or backward.
    """
    count, positions = qk.shape[0], qk.shape[1]
    rounds = ints["order"].shape[1]
    names = sorted(ints)
    per_round = ("order", "inverse", "bucket")

    def round_inputs(pair, r, values):
        """The (1, ...) slices of pair `pair`, round `r`, as `_attend_rounds`
        takes them."""
        part = {}
        for name, x in zip(names, values):
            row = tf.gather(x, pair)
            part[name] = (tf.gather(row, r)[None, None] if name in per_round
                          else row[None])
        return part

    def attend(pair, r, q, w, values):
        # Item pair * R + r numbers the dropout seed, forward and backward.
        # Reshapes, not indexing: the gradient of a slice is a zero-filled
        # full-size copy (StridedSliceGrad), one per round.
        out, lse = _attend_rounds(tf.expand_dims(q, 0), tf.expand_dims(w, 0),
                                  round_inputs(pair, r, values), pair * rounds + r,
                                  settings)
        return (tf.reshape(out, [positions, v.shape[-1]]),
                tf.reshape(lse, [positions]))

    @tf.custom_gradient
    def looped(qk, v, *values):
        def pair_forward(pair):
            q, w = tf.gather(qk, pair), tf.gather(v, pair)

            def body(r, top, total, acc, lses):
                out, lse = attend(pair, r, q, w, values)
                new_top = tf.maximum(top, lse)
                old, new = tf.exp(top - new_top), tf.exp(lse - new_top)
                acc = acc * old[:, None] + out * new[:, None]
                return r + 1, new_top, total * old + new, acc, lses.write(r, lse)

            start = (tf.constant(0), tf.fill([positions], tf.constant(-float("inf"), v.dtype)),
                     tf.zeros([positions], v.dtype), tf.zeros([positions, v.shape[-1]], v.dtype),
                     tf.TensorArray(v.dtype, size=rounds, element_shape=[positions]))
            _, _, total, acc, lses = tf.while_loop(
                lambda r, *_: r < rounds, body, start, parallel_iterations=1)
            return acc / total[:, None], lses.stack()

        combined, lse = over_groups(
            pair_forward, count,
            [_spec(v), tf.TensorSpec([rounds, positions], v.dtype)])

        def grad(d_combined, d_lse):
            # `lse` leaves only through a comparison (`strict`): no gradient.
            def pair_grad(pair):
                q, w = tf.gather(qk, pair), tf.gather(v, pair)
                mine, d_mine = tf.gather(combined, pair), tf.gather(d_combined, pair)
                weights = tf.nn.softmax(tf.gather(lse, pair), axis=0)  # (R, L)
                d_dot_mine = tf.reduce_sum(d_mine * mine, axis=-1)

                def body(r, d_q, d_w):
                    with tf.GradientTape() as tape:
                        tape.watch([q, w])
                        out, round_lse = attend(pair, r, q, w, values)
                    # combined = sum_r softmax(lse)_r out_r: the gradients
                    # of out_r and lse_r, from the recomputed out_r.
                    weight = tf.gather(weights, r)
                    d_out = d_mine * weight[:, None]
                    d_round_lse = weight * (
                        tf.reduce_sum(d_mine * out, axis=-1) - d_dot_mine)
                    g_q, g_w = tape.gradient([out, round_lse], [q, w],
                                             [d_out, d_round_lse])
                    return r + 1, d_q + g_q, d_w + g_w

                _, d_q, d_w = tf.while_loop(
                    lambda r, *_: r < rounds, body,
                    (tf.constant(0), tf.zeros_like(q), tf.zeros_like(w)),
                    parallel_iterations=1)
                return d_q, d_w

            # `after`: see `_loop_pairs`.
            d_qk, d_v = over_groups(pair_grad, count, [_spec(qk), _spec(v)],
                                    after=[combined])
            return [d_qk, d_v] + [None] * len(values)

        return (combined, lse), grad

    combined, lse = looped(qk, v, *[ints[n] for n in names])
    if settings["strict"]:
        combined = zero_without_key(combined, tf.stop_gradient(lse), axis=1)
    return combined


def _spec(x):
    """The spec of one row of `x` (its first axis dropped)."""
    return tf.TensorSpec(x.shape[1:], x.dtype)


def over_groups(fn, count, specs, after=()):
    """`fn(i)` for i in range(count), in order, one at a time; its outputs
    (one per `specs`, each a `tf.TensorSpec`) stacked on a new first axis.

    `fn` gathers its own slices of its inputs: `tf.map_fn` would first
    unstack every input into a TensorArray, a full copy of each (at 64K
    tokens, 64 MiB per (B, H, L, 64) tensor). `after`: tensors that must
    exist before the first iteration starts.
    """
    arrays = [tf.TensorArray(spec.dtype, size=count, element_shape=spec.shape)
              for spec in specs]
    start = tf.constant(0)
    if after:
        with tf.control_dependencies(after):
            start = tf.identity(start)

    def body(i, *arrays):
        outs = fn(i)
        return (i + 1, *[a.write(i, o) for a, o in zip(arrays, outs)])

    result = tf.while_loop(lambda i, *_: i < count, body, (start, *arrays),
                           parallel_iterations=1)
    return [a.stack() for a in result[1:]]
