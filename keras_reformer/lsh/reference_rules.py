"""LSH attention by the reference implementation's rules (HF transformers'
`LSHSelfAttention`, as the public pretrained Reformers were trained), for
`LSHAttention(reference_rules=True)`.

Where it differs from the library's own rules (`chunk_attention`):

- Rotations are per head, `(heads, key_dim, rounds, sum(factors) / 2)`, held
  by the layer (the reference draws them from its `hash_seed`).
- All rounds are sorted into one sequence (round, then bucket, then
  position) and cut into chunks; a chunk's window is itself and its
  neighbours in that sequence, wrapping around its ends. So the first chunk
  of a round also sees the last chunk of the round before, and a key can
  appear twice in a window.
- Causality masks by position inside these windows (a key after the query
  is masked), which is not prefix-stable: which keys share a chunk with a
  query depends on the buckets of later tokens.
- Keys are `x / sqrt(mean(x ** 2) + 1e-6) / sqrt(key_dim)`; a query's own
  key gets -1e5 (replacing its score), other masked keys -1e9.
- A sequence of at most one chunk is attended densely (no hashing).
- Padding positions hash to an extra last bucket of their round.
- The rounds are weighted by `exp(lse - logsumexp(lse))` as the reference
  computes it, without renormalizing (see `attend_heads`).

Memory: `attend_hashed` attends a group of heads at a time when all of
them at once would exceed its budget (see there); the reference computes
every head at once.

Shapes: B batch, H heads, R rounds, L length (a multiple of the chunk
length), D key width, E value width.
"""

import tensorflow as tf

from keras_reformer.lsh import scores, sorting
from keras_reformer.lsh.chunk_attention import GROUP_ELEMENTS, group_size, recomputed_map
from keras_reformer.ops.dropout import dropout as stateless_dropout

KEY_EPSILON = 1e-6


def reference_keys(qk):
    """The reference's keys: unit RMS, divided by sqrt(key_dim)."""
    width = tf.cast(tf.shape(qk)[-1], qk.dtype)
    return qk * tf.math.rsqrt(tf.reduce_mean(tf.square(qk), -1, keepdims=True)
                              + KEY_EPSILON) * tf.math.rsqrt(width)


def _masked_scores(dots, query_pos, key_pos, key_valid, causal):
    """The reference's masking: -1e9 on padding (and later keys, causal),
    then -1e5 on the query's own position whatever else holds."""
    allowed = key_valid
    if causal:
        allowed = allowed & (key_pos <= query_pos)
    dots = tf.where(allowed, dots, scores.MASK_VALUE)
    return tf.where(key_pos == query_pos, scores.SELF_MASK_VALUE, dots)


def _dropped(probabilities, rate, seed):
    return probabilities if not rate else stateless_dropout(probabilities, rate, seed)


def attend_dense(qk, v, valid, causal, dropout_rate=0.0, dropout_seed=None):
    """A sequence of at most one chunk: every key, the same masks."""
    keys = reference_keys(qk)
    dots = tf.einsum("bhqd,bhkd->bhqk", qk, keys)
    length = tf.shape(qk)[2]
    positions = tf.range(length)
    dots = _masked_scores(dots, positions[:, None], positions[None, :],
                          valid[:, None, None, :], causal)
    probabilities = _dropped(tf.nn.softmax(dots, -1), dropout_rate, dropout_seed)
    return tf.einsum("bhqk,bhke->bhqe", probabilities, v)


def attend_hashed(qk, v, valid, buckets, total, chunk, before, after, causal,
                  dropout_rate=0.0, dropout_seed=None, group_elements=GROUP_ELEMENTS):
    """LSH attention by the reference's rules, a group of heads at a time.

    The (chunk x window) scores of every head at once take `heads * rounds
    * L * W` floats (google/reformer-enwik8 at 64K tokens: 4.3 GB per
    tensor, several alive at once). Above `group_elements` per group the
    heads are attended a group at a time in a loop whose gradient recomputes
    each group instead of keeping its intermediates (as `chunk_attention`
    loops over rows). Each head's rounds stay together: the reference's
    windows wrap from one round into the next.

    Args: as `attend_heads`, and
        group_elements: scores computed at once (the memory knob).

    Returns:
        (B, H, L, E) float32.
    """
    heads, length = qk.shape[1], qk.shape[2]
    window = chunk * (before + 1 + after)

    def attend(qk, v, buckets, seed):
        return attend_heads(qk, v, valid, buckets, total, chunk, before, after,
                            causal, dropout_rate, seed)

    if heads is None:
        return attend(qk, v, buckets, dropout_seed)
    # A length known only at run time (generation over growing prefixes):
    # one head at a time, whatever the length turns out to be.
    group = 1 if length is None else group_size(
        heads, buckets.shape[2] * length * window, group_elements)
    if group == heads:
        return attend(qk, v, buckets, dropout_seed)
    return _loop_heads(attend, qk, v, buckets, dropout_seed, group)


def _loop_heads(attend, qk, v, buckets, seed, group):
    """`attend(qk, v, buckets, seed)` over groups of `group` heads, in a loop
    whose gradient recomputes each group (`recomputed_map`); group i's
    dropout seed is `seed` folded with i, the same in the forward pass and
    its recomputation."""
    heads = qk.shape[1]
    groups = heads // group

    def split(x):
        # (B, H, ...) -> (groups, B, group, ...)
        shape = tf.shape(x)
        x = tf.reshape(x, tf.concat([shape[:1], [groups, group], shape[2:]], 0))
        return tf.transpose(x, [1, 0] + list(range(2, len(x.shape))))

    def merge(x):
        # (groups, B, group, ...) -> (B, H, ...)
        x = tf.transpose(x, [1, 0] + list(range(2, len(x.shape))))
        shape = tf.shape(x)
        return tf.reshape(x, tf.concat([shape[:1], [heads], shape[3:]], 0))

    def attend_group(i, q, w, part):
        return attend(q, w, part, None if seed is None else seed + tf.stack([0, i]))

    v = split(v)
    out = recomputed_map(attend_group, groups, tf.TensorSpec(v.shape[1:], v.dtype),
                         [split(qk), v], [split(buckets)])
    return merge(out)


def attend_heads(qk, v, valid, buckets, total, chunk, before, after, causal,
                 dropout_rate=0.0, dropout_seed=None):
    """LSH attention by the reference's rules, every head at once.

    Args:
        qk: (B, H, L, D) float32 shared query/key vectors, L a multiple of
            `chunk`.
        v: (B, H, L, E) float32 values.
        valid: (B, L) bool, False on padding.
        buckets: (B, H, R, L) int32 bucket ids in [0, total), from
            `hashing.hash_per_head` with the layer's per-head rotations.
        total: the number of buckets.
        chunk, before, after: chunk length and window in chunks.
        causal: python bool.
        dropout_rate, dropout_seed: dropout on the attention probabilities
            (stateless, from a (2,) int32 seed).

    Returns:
        (B, H, L, E) float32.
    """
    shape = tf.shape(qk)
    batch, heads, length = shape[0], shape[1], shape[2]
    rounds = buckets.shape[2]
    # The rounds laid end to end, each sorted by (bucket, position) with
    # padding in a last bucket of its own: one sort by (round, bucket,
    # position), as the reference sorts, with its inverse alongside.
    sorted_order = sorting.sort_order(buckets, valid, total)
    sorted_pos = tf.reshape(sorted_order.order, [batch, heads, rounds * length])

    keys = reference_keys(qk)

    def gather(x):
        return tf.gather(x, sorted_pos, axis=2, batch_dims=2)

    def chunks(x):
        # (B, H, R*L, ...) -> (B, H, R*L / chunk, chunk, ...)
        rest = tf.constant(x.shape[3:].as_list(), tf.int32, shape=[len(x.shape) - 3])
        return tf.reshape(x, tf.concat([[batch, heads, -1, chunk], rest], 0))

    def window(x):
        # The chunk and its neighbours in the sorted sequence, wrapping.
        pieces = [tf.roll(x, shift=-offset, axis=2) for offset in range(-before, after + 1)]
        return tf.concat(pieces, axis=3) if len(pieces) > 1 else pieces[0]

    q = chunks(gather(qk))
    k = window(chunks(gather(keys)))
    values = window(chunks(gather(v)))
    query_pos = chunks(sorted_pos)
    key_pos = window(query_pos)
    key_valid = tf.gather(valid, key_pos, batch_dims=1)  # (B, H, n, W)
    dots = tf.einsum("bhncd,bhnwd->bhncw", q, k)
    dots = _masked_scores(dots, query_pos[..., None], key_pos[:, :, :, None, :],
                          key_valid[:, :, :, None, :], causal)
    lse = tf.reduce_logsumexp(dots, -1, keepdims=True)
    probabilities = _dropped(tf.exp(dots - lse), dropout_rate, dropout_seed)
    out = tf.einsum("bhncw,bhnwe->bhnce", probabilities, values)
    # Back from sorted slots to (round, position), then the rounds combined
    # by their share of the softmax mass.
    out = tf.gather(tf.reshape(out, [batch, heads, rounds, length, tf.shape(v)[-1]]),
                    sorted_order.inverse, axis=3, batch_dims=3)
    lse = tf.gather(tf.reshape(lse, [batch, heads, rounds, length]),
                    sorted_order.inverse, axis=3, batch_dims=3)
    # The reference's combination, rounding included: near the self-mask
    # value (-1e5) float32 resolves the logsumexp to 1/128 only, so a query
    # that sees only itself gets its value scaled by up to about 1.004.
    weights = tf.exp(lse - tf.reduce_logsumexp(lse, axis=2, keepdims=True))
    return tf.reduce_sum(out * weights[..., None], axis=2)
