"""Cached one-token decoding of causal LSH attention, as pure functions.

The causal rule of LSH attention (see `lsh.chunk_attention.chunk_bias`): in every
hash round, a query attends to itself and to the `reach = chunks_before *
bucket_size` most recent earlier real positions of its own bucket. That set
depends only on the tokens up to the query, so a cache that remembers, per
(batch, head, round, bucket), the last `reach` positions hashed there
reproduces the full pass exactly, one token at a time.

The cache (static shapes, sized by the longest sequence `M`, so a
`tf.while_loop` under XLA keeps it in place):

    keys    (B, H, M, D)  float32  unit-normalised shared-QK keys
    values  (B, H, M, E)  float32
    ring    (B, H, R, K, S) int32  per bucket, a ring buffer of the positions
                                   of its last S = max(reach, 1) members
                                   (-1: empty slot)
    count   (B, H, R, K)  int32    members of each bucket so far

K is the bucket count, R the hash rounds. A bucket's member number n (0-based,
in position order) lives in ring slot n % S, so the ring always holds the S
most recent members. A decode step reads one ring row per round (S
positions), gathers those keys and values, and writes one entry per round:
its cost is O(R * S * D), whatever the length of the text before it.
"""

import math

import tensorflow as tf

from keras_reformer.lsh.scores import (
    MASK_VALUE,
    SELF_MASK_VALUE,
    combine_rounds,
    unit_keys,
)
from keras_reformer.lsh.sorting import sort_order
from keras_reformer.ops.buffers import set_rows


def ring_size(reach):
    """Slots per bucket ring: `reach`, at least 1 (reach 0 = self only)."""
    return max(int(reach), 1)


def init_cache(qk, values, buckets, valid, num_buckets, reach, max_length):
    """The cache after a prompt pass.

    Args:
        qk: (B, H, P, D) float32 shared query/key vectors of the prompt.
        values: (B, H, P, E) float32.
        buckets: (B, H, R, P) int32, the prompt's buckets (inference rotations).
        valid: (B, P) bool; False marks padding, which is never a key.
        num_buckets: int, K.
        reach: int, earlier keys a causal query may see per round.
        max_length: int (or an int32 scalar tensor outside XLA), M >= P, the
            longest sequence the cache will hold.

    Returns:
        dict with "keys", "values", "ring", "count" (shapes in the module
        docstring).
    """
    prompt = qk.shape[2]
    if prompt is not None and isinstance(max_length, int) and prompt > max_length:
        raise ValueError(
            "The prompt must fit the cache: `qk`'s length <= max_length. "
            f"Received: length={prompt}, max_length={max_length}"
        )
    if prompt is None:  # a dynamic length (exported signatures): graph mode
        prompt = tf.shape(qk)[2]
    size = ring_size(reach)
    batch, heads, rounds = tf.shape(qk)[0], qk.shape[1], buckets.shape[2]
    # Sorted by (bucket, position), padding last in an extra bucket K: the
    # members of a bucket are a contiguous run, in position order.
    order, _, sorted_buckets = sort_order(buckets, valid, num_buckets)
    # Members per bucket (padding's extra bucket K dropped). A segment sum,
    # not a (P, K) one-hot: K is in the hundreds for long inputs.
    rows = tf.reshape(sorted_buckets, [-1, prompt])
    row_count = tf.shape(rows)[0]
    segments = tf.range(row_count)[:, None] * (num_buckets + 1) + rows
    count = tf.math.unsorted_segment_sum(
        tf.ones_like(segments), segments, row_count * (num_buckets + 1)
    )
    count = tf.reshape(count, [batch, heads, rounds, num_buckets + 1])[..., :num_buckets]
    start = tf.cumsum(count, axis=-1, exclusive=True)
    # Ring slot j holds the member n < count with n = j (mod S) that is most
    # recent: n = count - 1 - ((count - 1 - j) mod S); n < 0 means empty.
    slot = tf.range(size, dtype=tf.int32)
    member = count[..., None] - 1 - tf.math.floormod(count[..., None] - 1 - slot, size)
    sorted_index = tf.reshape(tf.maximum(start[..., None] + member, 0),
                              [batch, heads, rounds, num_buckets * size])
    position = tf.gather(order, sorted_index, axis=3, batch_dims=3)
    position = tf.reshape(position, [batch, heads, rounds, num_buckets, size])
    ring = tf.where(member >= 0, position, -1)
    pad = [[0, 0], [0, 0], [0, max_length - prompt], [0, 0]]
    return {
        "keys": tf.pad(unit_keys(qk), pad),
        "values": tf.pad(values, pad),
        "ring": ring,
        "count": count,
    }


def decode_step(cache, qk, values, buckets, position, reach, sliding_window=None,
                in_place=False, value_shift=False):
    """Causal LSH attention of one new token per row, and the updated cache.

    Args:
        cache: from `init_cache` (or a previous step).
        qk: (B, H, D) float32, the new token's shared query/key.
        values: (B, H, E) float32.
        buckets: (B, H, R) int32, its buckets (the same rotations as the prompt).
        position: (B,) int32, its position in each row (< M; every position
            before it that is a real token must already be in the cache).
        reach: int, as in `init_cache`.
        sliding_window: None or int; keys with `position - key >= it` are
            masked, as in the layer.
        in_place: overwrite the cache's buffers instead of returning updated
            copies (TensorFlow graph mode only, not XLA; the cache passed in
            must be owned -- see `ops.buffers.own` -- and is consumed). Without it, a
            step outside XLA copies every buffer: O(max_length) per token.
        value_shift: the layer's `value_shift`: the cache's values are
            shifted (`init_cache` was given `value_shift.shifted_values`), the token
            does not attend to itself, its value becomes that of the key at
            `position - 1` (every earlier position must be real, as after a
            right-padded prompt), and with no key in any round it outputs
            zeros.

    Returns:
        (out (B, H, E) float32, new cache).
    """
    ring, count = cache["ring"], cache["count"]
    batch, heads = tf.shape(qk)[0], qk.shape[1]
    rounds, size = ring.shape[2], ring.shape[4]
    depth = qk.shape[-1]
    # The ring rows of the token's bucket, one per round: (B, H, R, S).
    mine = tf.gather(ring, buckets[..., None], axis=3, batch_dims=3)[..., 0, :]
    members = tf.gather(count, buckets[..., None], axis=3, batch_dims=3)[..., 0]
    allowed = mine >= 0
    if reach == 0:
        allowed = tf.zeros_like(allowed)  # the ring is a placeholder slot
    if sliding_window is not None:
        allowed = tf.logical_and(
            allowed, position[:, None, None, None] - mine < sliding_window
        )
    index = tf.reshape(tf.maximum(mine, 0), [batch, heads, rounds * size])
    keys = tf.gather(cache["keys"], index, axis=2, batch_dims=2)
    old_values = tf.gather(cache["values"], index, axis=2, batch_dims=2)
    keys = tf.reshape(keys, [batch, heads, rounds, size, depth])
    old_values = tf.reshape(old_values, [batch, heads, rounds, size, values.shape[-1]])

    # The same arithmetic as the full pass: queries scaled first, then the
    # additive mask (its own key gets SELF_MASK_VALUE, masked keys MASK_VALUE).
    query = qk * (1.0 / math.sqrt(float(depth)))
    own_key = unit_keys(qk)
    ring_logits = tf.einsum("bhd,bhrsd->bhrs", query, keys)
    ring_logits = ring_logits + tf.where(allowed, 0.0, MASK_VALUE)
    attended = old_values
    if value_shift:
        # The key just before the token brings the token's own value (its
        # cache slot is written below, after these reads).
        previous = mine == (position - 1)[:, None, None, None]
        attended = tf.where(previous[..., None], values[:, :, None, None, :], old_values)
        logits = ring_logits  # no self key: (B, H, R, S)
    else:
        self_logit = tf.reduce_sum(query * own_key, -1)[:, :, None, None] + SELF_MASK_VALUE
        self_logit = tf.broadcast_to(self_logit, [batch, heads, rounds, 1])
        logits = tf.concat([ring_logits, self_logit], axis=-1)  # (B, H, R, S + 1)
    lse = tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
    probs = tf.exp(logits - lse)
    out = tf.einsum("bhrs,bhrse->bhre", probs[..., :size], attended)
    if not value_shift:
        out = out + probs[..., size:] * values[:, :, None, :]
    # Rounds weigh by their share of the total softmax mass; with shifted
    # values a query with no allowed key gets zeros, as in the full pass.
    out = combine_rounds(out, lse[..., 0], axis=2, strict=value_shift)

    # Write the token: its key/value at its position, its position into the
    # next ring slot of its bucket in every round. Each write is one row of
    # a flat view, so that it costs O(1) whatever the cache size.
    reads = [keys, old_values, mine, members]
    rows = tf.range(batch)[:, None] * heads + tf.range(heads)[None, :]  # (B, H)
    length = tf.shape(cache["keys"])[2]
    at = tf.reshape(rows * length + position[:, None], [-1])
    new_keys = set_rows(cache["keys"], at, own_key, in_place, reads)
    if value_shift:
        # Its value belongs to the key before it; its own slot stays zero
        # until the next token. (Position 0 has no key before it: a prompt
        # row holds at least one token, so decoding never starts there.)
        at = tf.reshape(rows * length + tf.maximum(position - 1, 0)[:, None], [-1])
    new_values = set_rows(cache["values"], at, values, in_place, reads)
    num_buckets = count.shape[3]
    bucket_row = tf.reshape(
        (rows[:, :, None] * rounds + tf.range(rounds)) * num_buckets + buckets, [-1]
    )
    new_count = set_rows(count, bucket_row, members + 1, in_place, reads)
    slot_row = bucket_row * size + tf.reshape(tf.math.floormod(members, size), [-1])
    new_ring = set_rows(
        ring, slot_row, tf.broadcast_to(position[:, None, None], [batch, heads, rounds]),
        in_place, reads,
    )
    return out, {
        "keys": new_keys, "values": new_values, "ring": new_ring, "count": new_count,
    }

