"""Attention of sorted chunks over their windows, in bounded memory.

Every (batch, head) row of LSH attention is sorted, once per hash round, by
(bucket, position), cut into N chunks of C slots, and every chunk attends to
a window of W = C * (before + 1 + after) slots. The (C x W) logits of all
rows at once take `rows * rounds * L * W` floats (at 64K tokens, 4 heads and
2 rounds: 268 MB per tensor, several alive at once), so long inputs are
processed a group of rows at a time, from sorting to the combination of the
rounds, in a `tf.while_loop` whose gradient recomputes each group instead of
keeping its intermediates: memory stays at one group's worth, forward and
backward, whatever the length. A group is one (row, round) at the least;
when even that exceeds the budget (from 16K tokens with the defaults), its
chunks are attended a range at a time, each range reading its windows from
the sorted row padded with outside chunks, and the backward pass recomputes
range by range too.

Shapes use: B batch, H heads, R hash rounds, L (padded) length, N = L / C
chunks of C = bucket_size positions, W keys per chunk, D key width, E value
width; a group holds g rows.
"""

import collections
import dataclasses
import math

import tensorflow as tf

from keras_reformer.lsh.permutation import gather_rounds, unsort_rounds
from keras_reformer.lsh.scores import (
    bias_from_masks,
    combine_rounds,
    unit_keys,
    zero_without_key,
)
from keras_reformer.ops.dropout import keep_mask

# Logit elements per group of rows (2^20 float32 = 4 MiB per (C x W) tensor).
# Smaller groups are cheaper, not dearer, although each is recomputed in the
# backward pass: with one (batch, head) row per group instead of all four,
# the reference model's step at 4K ran at 7,770 instead of 7,000 tokens/s
# in 948 instead of 1,028 MiB, and at 16K in 1,270 instead of 1,570 MiB at
# the same speed (benchmarks/train_step.py points, 2^20 against 2^22-2^23).
GROUP_ELEMENTS = 2**20


@dataclasses.dataclass(frozen=True)
class ChunkSettings:
    """The static (python) settings of chunked LSH attention.

    Attributes:
        bucket_size: C, the chunk length.
        chunks_before, chunks_after: chunks each chunk also attends to.
        causal: the causal rule for every row: a query sees only keys of
            its own bucket at most `chunks_before * C` sorted slots back, so
            its output never depends on later tokens.
        strict: causal queries never attend to themselves; one with no
            earlier key in any round outputs zeros (shifted values).
        sliding_window: None or int; keys with |query - key| >= it are masked.
        dropout_rate: attention dropout on the probabilities.
        group_elements: logits computed at once (the memory knob).
    """

    bucket_size: int
    chunks_before: int = 1
    chunks_after: int = 0
    causal: bool = False
    strict: bool = False
    sliding_window: int = None
    dropout_rate: float = 0.0
    group_elements: int = GROUP_ELEMENTS

    @property
    def width(self):
        """W, the keys of one chunk's window."""
        return self.bucket_size * (self.chunks_before + 1 + self.chunks_after)


# The run-time tensors besides the queries and values, closed over by the
# loops: `length` L; `query_key_mask` None or (M, L * L) bool explicit masks
# of allowed (query, key), M mask rows; `causal_rows` None or (K,) bool, the
# causal-rule flags, K flag rows; `seed` the (2,) int32 dropout seed.
_Context = collections.namedtuple(
    "_Context", ["settings", "length", "query_key_mask", "causal_rows", "seed"]
)

# Per row: `order`, `inverse`, `bucket` (rows, R, L) int32 (sorted slot ->
# position, its inverse, the bucket at each sorted slot); `valid` (rows, L)
# bool; `mask_index`, `causal_index` (rows,) int32, the row's row of the
# explicit masks and of the causal-rule flags.
RowIndex = collections.namedtuple(
    "RowIndex", ["order", "inverse", "bucket", "valid", "mask_index", "causal_index"]
)
_PER_ROUND = ("order", "inverse", "bucket")

# What each sorted slot holds, (rows, N, C) per field, and the value of the
# slots that the look-around brings in from outside the row.
Slots = collections.namedtuple("Slots", ["position", "bucket", "valid"])
_OUTSIDE = Slots(position=-1, bucket=-1, valid=False)


def attend(qk, values, sorted_order, valid, settings, *,
           query_key_mask=None, causal_rows=None, dropout_seed=None):
    """Chunked attention within sorted buckets, rounds combined by logsumexp.

    Args:
        qk: (B, H, L, D) float shared query/key vectors; L % C == 0; float32
            in the layer, float64 in gradient tests.
        values: (B, H, L, E), the same dtype.
        sorted_order: `sorting.SortedOrder` of the hash rounds' buckets.
        valid: (B, L) bool; False marks padding (never a key, sorted last).
        settings: `ChunkSettings`.
        query_key_mask: optional (Bm, Hm, L, L) bool mask of allowed
            (query, key), Bm in {1, B}, Hm in {1, H} (broadcast).
        causal_rows: optional (Bc, Hc) bool, Bc in {1, B}, Hc in {1, H}:
            rows whose mask admits no later key, which then follow the
            causal rule (see `chunk_bias`).
        dropout_seed: (2,) int32 seed of the attention dropout.

    Returns:
        (B, H, L, E) attention output.
    """
    batch, heads = tf.shape(qk)[0], qk.shape[1]
    length = tf.shape(qk)[2]
    static_rows = None if qk.shape[0] is None else qk.shape[0] * heads

    def rows(x):
        """(B, H, ...) -> (B * H, ...), keeping static sizes."""
        flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
        return tf.ensure_shape(flat, [static_rows] + x.shape[2:].as_list())

    def per_row(x):
        """(B, ...) -> (B * H, ...): the same row for every head."""
        return rows(tf.repeat(x[:, None], heads, axis=1))

    def broadcast_index(x):
        """(B, H) int32: each (batch, head)'s row of `x` (Bx, Hx, ...)
        flattened to (Bx * Hx, ...), Bx in {1, B}, Hx in {1, H}."""
        if x is None:
            return tf.zeros([batch, heads], tf.int32)
        b_index = tf.range(batch)[:, None] if x.shape[0] != 1 else tf.zeros([batch, 1], tf.int32)
        h_index = tf.range(heads)[None, :] if x.shape[1] != 1 else tf.zeros([1, heads], tf.int32)
        return b_index * x.shape[1] + h_index

    flat_mask = flat_causal = None
    if query_key_mask is not None:
        flat_mask = tf.reshape(
            query_key_mask, [query_key_mask.shape[0] * query_key_mask.shape[1], -1])
        if causal_rows is not None:
            flat_causal = tf.reshape(causal_rows, [-1])
    index = RowIndex(
        order=rows(sorted_order.order),
        inverse=rows(sorted_order.inverse),
        bucket=rows(sorted_order.buckets),
        valid=per_row(valid),
        mask_index=rows(broadcast_index(query_key_mask)),
        causal_index=rows(broadcast_index(causal_rows)),
    )
    context = _Context(settings, length, flat_mask, flat_causal, dropout_seed)
    out = attend_rows(rows(qk), rows(values), index, context)
    return tf.reshape(out, [batch, heads, length, values.shape[-1]])


def attend_rows(qk, v, index, context):
    """LSH attention of every row; a loop over groups of rows if large.

    Args:
        qk: (rows, L, D) queries (keys are their unit vectors).
        v: (rows, L, E) values, the same dtype.
        index: `RowIndex` for all rows.
        context: `_Context`.

    Returns:
        (rows, L, E).
    """
    settings = context.settings
    count, rounds, positions = qk.shape[0], index.order.shape[1], qk.shape[1]
    if None not in (count, rounds, positions):
        budget = settings.group_elements
        row_elements = rounds * positions * settings.width
        if count * row_elements > budget:
            if row_elements > budget:
                # One row's rounds do not fit at once (64K tokens and beyond
                # with the default budget), even when there is only one row
                # (batch 1 and one head, or heads taken one at a time): one
                # (row, round) at a time, a range of chunks at a time when
                # even one round does not fit.
                return _loop_rounds(_attend_rounds, qk, v, index, context)
            group = group_size(count, row_elements, budget)
            return _loop_groups(_attend_group, qk, v, index, context, group)
    # Everything fits at once (or the sizes are known only at run time):
    # autodiff keeps the probabilities.
    return _attend_group(qk, v, index, 0, context)


def group_size(count, item_elements, budget=GROUP_ELEMENTS):
    """Largest divisor g of `count` with g * item_elements <= budget (>= 1)."""
    best = 1
    for g in range(1, count + 1):
        if count % g == 0 and g * item_elements <= budget:
            best = g
    return best


def _attend_group(qk, v, index, group_index, context):
    """`_attend_rounds`, the rounds combined: (g, L, E)."""
    out, lse = _attend_rounds(qk, v, index, group_index, context)
    # Each round weighs by its share of the total softmax mass.
    with tf.name_scope("lsh_combine"):
        return combine_rounds(out, lse, axis=1, strict=context.settings.strict)


def _attend_rounds(qk, v, index, group_index, context):
    """Attention of a group of rows in the rounds of `index`, each round's
    output and logsumexp back in original order.

    Sorting, chunked attention and unsorting all happen here, so only
    (rows, rounds, L, width) tensors leave a group: nothing of size
    rounds x L x window is kept for backward.

    Args:
        qk: (g, L, D) queries; v: (g, L, E) values.
        index: `RowIndex` of the g rows.
        group_index: scalar, numbers the dropout seed of the group.

    Returns:
        out (g, R, L, E) and lse (g, R, L).
    """
    order, inverse = index.order, index.inverse
    count, rounds, length = tf.shape(order)[0], order.shape[1], tf.shape(order)[2]
    size = context.settings.bucket_size

    def chunks(x):
        """(g, R, L, ...) -> (g * R, L / C, C, ...)."""
        tail = tf.shape(x)[3:]
        return tf.reshape(x, tf.concat([[-1, length // size, size], tail], 0))

    slots = Slots(
        position=chunks(order),
        bucket=chunks(index.bucket),
        valid=chunks(tf.gather(index.valid, order, axis=1, batch_dims=1)),
    )
    def per_chunk_row(x):
        """(g,) -> (g * R,): a row's value for each of its rounds."""
        return chunks(tf.broadcast_to(x[:, None, None], tf.shape(order)))[:, 0, 0]

    sorted_qk = chunks(gather_rounds(qk, order, inverse))
    sorted_v = chunks(gather_rounds(v, order, inverse))
    with tf.name_scope("chunk_attention"):  # scopes name the profile's categories
        out, lse = _attend_chunks(
            sorted_qk, sorted_v, slots, per_chunk_row(index.mask_index),
            per_chunk_row(index.causal_index), group_index, context
        )
    out = unsort_rounds(
        tf.reshape(out, [count, rounds, length, v.shape[-1]]), order, inverse
    )
    lse = unsort_rounds(tf.reshape(lse, [count, rounds, length]), order, inverse)
    return out, lse


def _attend_chunks(q, v, slots, mask_index, causal_index, group_index, context):
    """Sorted chunks (g * R, N, C, ...): keys, windows, mask, dropout,
    attention -> out (g * R, N, C, E), lse (g * R, N, C).

    Keys are derived from the sorted queries here rather than gathered, so
    that no full-length copy of them is kept for the backward pass.
    """
    before, after = context.settings.chunks_before, context.settings.chunks_after
    window = Slots(*[
        look_around(field, before, after, outside)
        for field, outside in zip(slots, _OUTSIDE)
    ])
    seed = None
    if context.settings.dropout_rate > 0:
        # Folding the group index into the step's seed gives every group
        # (and, with a fresh step seed, every step) an independent mask;
        # `seed + [0, g]` made group g of one step reuse group 0's mask of
        # a later step.
        seed = tf.random.experimental.stateless_fold_in(context.seed, group_index)
    return _attend_windows(
        q, look_around(unit_keys(q), before, after), look_around(v, before, after),
        slots, window, mask_index, causal_index, seed, context,
    )


def _attend_windows(q, keys, v, slots, window, mask_index, causal_index, seed,
                    context):
    """Chunks of queries (items, n, C, D) against their windows of keys and
    values (items, n, W, ...) and slots (`Slots` of (items, n, C) and
    (items, n, W)): mask (the rows' query-key masks and causal flags at
    `mask_index`, `causal_index`), dropout (from `seed`), attention -> out
    (items, n, C, E), lse (items, n, C)."""
    settings = context.settings
    mask_rows = causal_rows = None
    if context.query_key_mask is not None:
        mask_rows = tf.gather(context.query_key_mask, mask_index)
    if context.causal_rows is not None:
        causal_rows = tf.gather(context.causal_rows, causal_index)
    bias = chunk_bias(slots, window, settings, mask_rows, causal_rows,
                      context.length, dtype=q.dtype)
    keep = None
    if settings.dropout_rate > 0:
        keep = keep_mask(tf.shape(bias), settings.dropout_rate, seed, q.dtype)
    out, lse = softmax_attention(
        q * (1.0 / math.sqrt(float(q.shape[-1]))), keys, v, bias, keep)
    return out, lse[..., 0]


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


def chunk_bias(query, key, settings, mask_rows=None, causal_rows=None,
               length=None, dtype=tf.float32):
    """Additive mask of each chunk's queries against its key window.

    Args:
        query: `Slots` of (rows, N, C) tensors for the query slots.
        key: `Slots` of (rows, N, W) tensors for the key window; slots
            outside the row have position and bucket -1 and valid False.
        settings: `ChunkSettings` (`causal`, `strict`, `sliding_window`,
            and `chunks_before`: a causal query may look `chunks_before * C`
            sorted slots back).
        mask_rows: None or (rows, L * L) bool explicit query-key masks.
        causal_rows: None or (rows,) bool: rows that follow the causal rule
            although `settings.causal` is False (their explicit mask admits
            no later key, so they must not see the future through the chunk
            windows).
        length: scalar, L (for indexing `mask_rows`).

    Returns:
        (rows, N, C, W) float32.
    """
    before = settings.chunks_before
    size, width = query.bucket.shape[-1], key.bucket.shape[-1]
    # Slot distances and the query's own key follow from the window's
    # layout alone: (C, W) tables instead of two (rows, N, C, W) integer
    # tensors (64 MiB each per row at 64K tokens). Positions are unique
    # within a row, so "same position" is "distance 0".
    back = window_back(size, width, before)
    own = tf.equal(back, 0)

    # Chunk boundaries move with the buckets of later tokens, so a causal
    # query that saw "its chunk and the one before" would see a key set that
    # depends on the future. Instead it sees the `before * C` most recent
    # keys of its own bucket: a set fixed by the tokens up to it. Within a
    # bucket sorted order is position order, so slot distance in
    # [0, before * C] is "earlier and recent". Padding has a bucket of its
    # own, so the bucket test also masks padding keys for real queries, and
    # wrapped-in keys (bucket -1) for all. `strict`: shifted values, where
    # the key at j brings the value after j, so the self key would bring
    # the query's own future.
    def causal_masked():
        far = tf.logical_or(back < 0, back > before * size)
        if settings.strict:
            far = tf.logical_or(far, own)
        return tf.logical_or(far, query.bucket[..., :, None] != key.bucket[..., None, :])

    if settings.causal:
        masked = causal_masked()
    else:
        masked = tf.logical_not(key.valid)[..., None, :]
        if causal_rows is not None:
            masked = tf.where(causal_rows[:, None, None, None], causal_masked(), masked)
    if settings.sliding_window is not None or mask_rows is not None:
        q_pos = query.position[..., :, None]
        k_pos = key.position[..., None, :]
    if settings.sliding_window is not None:
        masked = tf.logical_or(masked, tf.abs(q_pos - k_pos) >= settings.sliding_window)
    if mask_rows is not None:
        rows = tf.shape(mask_rows)[0]
        flat = q_pos * length + tf.maximum(k_pos, 0)
        allowed = tf.gather(mask_rows, tf.reshape(flat, [rows, -1]), batch_dims=1)
        masked = tf.logical_or(masked, tf.logical_not(tf.reshape(allowed, tf.shape(flat))))
    return bias_from_masks(own, masked, dtype)


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


def _loop_groups(attend_group, qk, v, index, context, group):
    """`attend_group` (`_attend_group`) over groups of `group` rows in a loop
    whose gradient recomputes each group instead of keeping its
    intermediates (`recomputed_map`). The loop knows only the shape of the
    work, not the attention it repeats."""
    count, positions = qk.shape[0], qk.shape[1]
    groups = count // group

    def split(x):
        return tf.reshape(x, [groups, group] + x.shape[1:].as_list())

    def attend(i, q, w, *fields):
        return attend_group(q, w, RowIndex(*fields), i, context)

    out = recomputed_map(attend, groups, _spec(split(v)), [split(qk), split(v)],
                         [split(x) for x in index])
    return tf.reshape(out, [count, positions, v.shape[-1]])


def _loop_rounds(attend_rounds, qk, v, index, context):
    """`attend_rounds` (`_attend_rounds`) one (row, round) at a time, the
    rounds combined, in a loop whose gradient recomputes each round instead
    of keeping its intermediates.

    The rounds of a row are combined as they come (a running logsumexp),
    so besides one round's logits only the combined output and each round's
    logsumexp (rows, R, L) are kept: no (rows, R, L, E) tensor of all
    rounds' outputs exists, forward or backward.
    """
    count, positions = qk.shape[0], qk.shape[1]
    rounds = index.order.shape[1]

    def round_inputs(row, r, fields):
        """The (1, ...) slices of row `row`, round `r`, as `attend_rounds`
        takes them."""
        part = {}
        for name, x in zip(RowIndex._fields, fields):
            own_row = tf.gather(x, row)
            part[name] = (tf.gather(own_row, r)[None, None] if name in _PER_ROUND
                          else own_row[None])
        return RowIndex(**part)

    span = _range_span(positions, context.settings)

    def attend(row, r, q, w, fields):
        # Item row * R + r numbers the dropout seed, forward and backward.
        # Reshapes, not indexing: the gradient of a slice is a zero-filled
        # full-size copy (StridedSliceGrad), one per round.
        part, item = round_inputs(row, r, fields), row * rounds + r
        if span is None:
            out, lse = attend_rounds(tf.expand_dims(q, 0), tf.expand_dims(w, 0),
                                     part, item, context)
        else:
            out, lse = _ranged_forward(q, w, part, item, span, context)
        return (tf.reshape(out, [positions, v.shape[-1]]),
                tf.reshape(lse, [positions]))

    def round_grad(row, r, q, w, fields, d_mine, weight, d_dot_mine):
        """The gradients for q and w of round r's share of the combined
        output (whose gradient is `d_mine`)."""
        if span is not None:
            return _ranged_grad(q, w, round_inputs(row, r, fields), row * rounds + r,
                                span, context, d_mine, weight, d_dot_mine)
        with tf.GradientTape() as tape:
            tape.watch([q, w])
            out, round_lse = attend(row, r, q, w, fields)
        # combined = sum_r softmax(lse)_r out_r: the gradients of out_r
        # and lse_r, from the recomputed out_r.
        d_out, d_round_lse = _round_output_grads(out, d_mine, weight, d_dot_mine)
        return tape.gradient([out, round_lse], [q, w], [d_out, d_round_lse])

    @tf.custom_gradient
    def looped(qk, v, *fields):
        def row_forward(row):
            q, w = tf.gather(qk, row), tf.gather(v, row)

            def body(r, top, total, acc, lses):
                out, lse = attend(row, r, q, w, fields)
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
            row_forward, count,
            [_spec(v), tf.TensorSpec([rounds, positions], v.dtype)])

        def grad(d_combined, d_lse):
            # `lse` leaves only through a comparison (`strict`): no gradient.
            def row_grad(row):
                q, w = tf.gather(qk, row), tf.gather(v, row)
                mine, d_mine = tf.gather(combined, row), tf.gather(d_combined, row)
                weights = tf.nn.softmax(tf.gather(lse, row), axis=0)  # (R, L)
                d_dot_mine = tf.reduce_sum(d_mine * mine, axis=-1)

                def body(r, d_q, d_w):
                    g_q, g_w = round_grad(row, r, q, w, fields, d_mine,
                                          tf.gather(weights, r), d_dot_mine)
                    return r + 1, d_q + g_q, d_w + g_w

                _, d_q, d_w = tf.while_loop(
                    lambda r, *_: r < rounds, body,
                    (tf.constant(0), tf.zeros_like(q), tf.zeros_like(w)),
                    parallel_iterations=1)
                return d_q, d_w

            # `after`: see `_loop_groups`.
            d_qk, d_v = over_groups(row_grad, count, [_spec(qk), _spec(v)],
                                    after=[combined])
            return [d_qk, d_v] + [None] * len(fields)

        return (combined, lse), grad

    combined, lse = looped(qk, v, *index)
    if context.settings.strict:
        combined = zero_without_key(combined, tf.stop_gradient(lse), axis=1)
    return combined


def _round_output_grads(out, d_combined, weight, d_dot_combined):
    """The gradients of one round's output and logsumexp, from the
    gradient `d_combined` of the rounds' combination (`combine_rounds`),
    the round's weight (its softmax share) and `sum(d_combined *
    combined, -1)`; positions in any one order, the features last."""
    d_out = d_combined * weight[..., None]
    d_lse = weight * (tf.reduce_sum(d_combined * out, axis=-1) - d_dot_combined)
    return d_out, d_lse


def _range_span(positions, settings):
    """Chunks per range when one (row, round) is attended a range of chunks
    at a time (its N * C * W logits above `group_elements`: from 16K tokens
    with the defaults), or None (all chunks at once). A range holds at least
    the chunks a window reaches outside its own chunk."""
    size, width = settings.bucket_size, settings.width
    chunks = positions // size
    if chunks * size * width <= settings.group_elements:
        return None
    span = group_size(chunks, size * width, settings.group_elements)
    halo = settings.chunks_before + settings.chunks_after
    return span if halo <= span < chunks else None


# One (row, round) in sorted order: `q`, `v` (1, before + N + after, C, ...)
# the sorted chunks between `chunks_before` and `chunks_after` chunks of
# zeros, `slots` the same for `Slots` (outside slots there), so that a range
# of chunks reads its windows by slicing; `order` and `inverse` (L,).
_SortedRound = collections.namedtuple(
    "_SortedRound",
    ["q", "v", "slots", "mask_index", "causal_index", "order", "inverse"])


def _sort_round(q, v, index, context):
    """q (L, D), v (L, E) and their round's `RowIndex` (one row, one round)
    as a `_SortedRound`."""
    settings = context.settings
    size, length = settings.bucket_size, q.shape[0]
    order, inverse = index.order[0, 0], index.inverse[0, 0]

    def padded_chunks(x, value):
        x = tf.reshape(x, [1, length // size, size] + x.shape[1:].as_list())
        pads = [[0, 0], [settings.chunks_before, settings.chunks_after]]
        return tf.pad(x, pads + [[0, 0]] * (len(x.shape) - 2), constant_values=value)

    fields = Slots(position=order, bucket=index.bucket[0, 0],
                   valid=tf.gather(index.valid[0], order))
    with tf.name_scope("lsh_gather"):
        sorted_q, sorted_v = tf.gather(q, order), tf.gather(v, order)
    return _SortedRound(
        q=padded_chunks(sorted_q, 0.0), v=padded_chunks(sorted_v, 0.0),
        slots=Slots(*[padded_chunks(f, o) for f, o in zip(fields, _OUTSIDE)]),
        mask_index=index.mask_index, causal_index=index.causal_index,
        order=order, inverse=inverse,
    )


def _slab(x, i, span, halo):
    """Chunks [i * span, i * span + span + halo) of a padded round tensor."""
    begin = tf.stack([0, i * span] + [0] * (len(x.shape) - 2))
    return tf.slice(x, begin, [1, span + halo] + x.shape[2:].as_list())


def _range_seed(context, item, i):
    """The dropout seed of range i of item `item` (None without dropout)."""
    if context.settings.dropout_rate == 0:
        return None
    fold = tf.random.experimental.stateless_fold_in
    return fold(fold(context.seed, item), i)


def _attend_range(sorted_round, i, item, span, context, q=None, v=None):
    """Range i of a `_SortedRound`'s chunks (or of the slabs `q`, `v`
    given for it): out (1, span, C, E), lse (1, span, C)."""
    settings = context.settings
    before, after = settings.chunks_before, settings.chunks_after
    halo = before + after
    q = _slab(sorted_round.q, i, span, halo) if q is None else q
    v = _slab(sorted_round.v, i, span, halo) if v is None else v
    slots = Slots(*[_slab(f, i, span, halo) for f in sorted_round.slots])

    def own(x):
        return x[:, before:before + span]

    def windows(x):
        return tf.concat([x[:, before + o:before + o + span]
                          for o in range(-before, after + 1)], axis=2)

    with tf.name_scope("chunk_attention"):
        return _attend_windows(
            own(q), windows(unit_keys(q)), windows(v),
            Slots(*[own(f) for f in slots]), Slots(*[windows(f) for f in slots]),
            sorted_round.mask_index, sorted_round.causal_index,
            _range_seed(context, item, i), context,
        )


def _ranged_forward(q, v, index, item, span, context):
    """`_attend_rounds` of one (row, round), q (L, D) and v (L, E), a range
    of `span` chunks at a time: out (L, E) and lse (L,)."""
    sorted_round = _sort_round(q, v, index, context)
    size, length, width = context.settings.bucket_size, q.shape[0], v.shape[-1]

    def one(i):
        out, lse = _attend_range(sorted_round, i, item, span, context)
        return out[0], lse[0]

    out, lse = over_groups(one, length // (size * span), [
        tf.TensorSpec([span, size, width], v.dtype), tf.TensorSpec([span, size], v.dtype)])
    with tf.name_scope("lsh_unsort"):
        inverse = sorted_round.inverse
        return (tf.gather(tf.reshape(out, [length, width]), inverse),
                tf.gather(tf.reshape(lse, [length]), inverse))


def _ranged_grad(q, v, index, item, span, context, d_combined, weight,
                 d_dot_combined):
    """The gradients for q (L, D) and v (L, E) of one round's share of the
    combined output, recomputed a range of `span` chunks at a time (see
    `_round_output_grads` for the other arguments, in original order)."""
    sorted_round = _sort_round(q, v, index, context)
    settings = context.settings
    size, length = settings.bucket_size, q.shape[0]
    halo = settings.chunks_before + settings.chunks_after
    order = sorted_round.order

    def sorted_chunks(x):
        return tf.reshape(tf.gather(x, order), [1, length // size, size] + x.shape[1:].as_list())

    upstream = [sorted_chunks(x) for x in (d_combined, weight, d_dot_combined)]

    def one(i):
        q_slab = _slab(sorted_round.q, i, span, halo)
        v_slab = _slab(sorted_round.v, i, span, halo)
        with tf.GradientTape() as tape:
            tape.watch([q_slab, v_slab])
            out, lse = _attend_range(sorted_round, i, item, span, context, q_slab, v_slab)
        d_out, d_lse = _round_output_grads(
            out, *[_slab(x, i, span, 0) for x in upstream])
        g_q, g_v = tape.gradient([out, lse], [q_slab, v_slab], [d_out, d_lse])
        return g_q[0], g_v[0]

    slabs = over_groups(one, length // (size * span), [
        tf.TensorSpec([span + halo, size, x.shape[-1]], x.dtype) for x in (q, v)])
    with tf.name_scope("lsh_unsort"):
        return [tf.gather(_fold_slabs(g, span, settings.chunks_before, length), sorted_round.inverse)
                for g in slabs]


def _fold_slabs(slabs, span, before, length):
    """Per-range gradients (ranges, span + halo, C, D) of the padded chunks
    each range read, summed where ranges overlap: (L, D) in sorted order."""
    ranges, halo = slabs.shape[0], slabs.shape[1] - span
    rest = slabs.shape[2:].as_list()
    own = slabs[:, :span]
    if halo:
        # Range i's last `halo` chunks are the first ones of range i + 1; the
        # last range's are the padding after the row. Added where they
        # overlap, rather than padding both parts to the whole row and
        # summing those (three more row-sized tensors).
        tail = slabs[:, span:]
        first = tf.concat([own[:1, :halo], own[1:, :halo] + tail[:-1]], axis=0)
        own = tf.concat([first, own[:, halo:]], axis=1)
        chunks = tf.concat([tf.reshape(own, [ranges * span] + rest), tail[-1]], axis=0)
    else:
        chunks = tf.reshape(own, [ranges * span] + rest)
    return tf.reshape(chunks[before:before + ranges * span], [length, rest[-1]])


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


def recomputed_map(fn, count, out_spec, differentiable, rest=()):
    """`fn(i, *[x[i] for x in differentiable], *[x[i] for x in rest])` for i
    in range(count), stacked, in a loop (`over_groups`) whose gradient
    recomputes each item instead of keeping its intermediates.

    Args:
        fn: `(i, *slices) -> tensor` of `out_spec`; deterministic given its
            arguments (random numbers from seeds it derives from `i`).
        count: int, the items (the first axis of every input).
        out_spec: `tf.TensorSpec` of one item's output.
        differentiable: float tensors, each differentiated.
        rest: tensors `fn` reads but that get no gradient (indices, masks).

    Returns:
        (count, ...) the stacked outputs.
    """
    def item(i, inputs):
        return [tf.gather(x, i) for x in inputs]

    @tf.custom_gradient
    def looped(*inputs):
        grads_for, fixed = inputs[:len(differentiable)], inputs[len(differentiable):]
        (out,) = over_groups(
            lambda i: (fn(i, *item(i, grads_for), *item(i, fixed)),), count, [out_spec])

        def grad(d_out):
            def item_grad(i):
                parts = item(i, grads_for)
                with tf.GradientTape() as tape:
                    tape.watch(parts)
                    out = fn(i, *parts, *item(i, fixed))
                # d_out enters the recomputation's gradient, so XLA cannot
                # hoist the recomputation into the forward pass.
                return tuple(tape.gradient(out, parts, tf.gather(d_out, i)))

            # `after`: in a reversible backward pass the forward loop above
            # has just been rerun to recompute the block's output; nothing
            # else orders the two loops, and run side by side they hold two
            # items' intermediates at once.
            grads = over_groups(item_grad, count, [_spec(x) for x in grads_for],
                                after=[out])
            return list(grads) + [None] * len(fixed)

        return out, grad

    return looped(*differentiable, *rest)
