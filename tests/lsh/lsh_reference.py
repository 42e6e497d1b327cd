"""Brute-force LSH attention in NumPy, for checking the chunked layer.

Everything here is dense (length x length) and written from the paper (Kitaev et al., 2020),
sharing no code with keras_reformer.lsh: hashing is argmax([xR; -xR]) on the
layer's own rotations (the only thing taken from the layer, as they are its
random source), allowed pairs are built from the buckets per round, and the
rounds are combined by their logsumexp weights. `dense_lsh_tf` is the same
attention in float64 TensorFlow, for gradients by autodiff.
"""

import numpy as np
import tensorflow as tf

MASK = -1e9
SELF = -1e5


def projections(layer, x):
    """qk (B, H, L, D), v (B, H, L, E) computed from the layer's weights."""
    def dense(sub, inputs):
        out = np.einsum("blc,che->bhle", inputs, np.asarray(sub.kernel))
        if sub.bias is not None:
            out = out + np.asarray(sub.bias)[None, :, None, :]
        return out

    x = np.asarray(x, np.float64)
    return dense(layer.qk_dense, x), dense(layer.value_dense, x)


def output_projection(layer, attended):
    """attended (B, H, L, E) -> (B, L, out)."""
    kernel = np.asarray(layer.output_dense.kernel)
    out = np.einsum("bhle,heo->blo", attended, kernel)
    if layer.output_dense.bias is not None:
        out = out + np.asarray(layer.output_dense.bias)
    return out


def _rotated(qk, rot):
    """[xR; -xR], (B, H, R, L, n): the scores whose argmax is the bucket."""
    proj = np.einsum("bhld,drk->bhrlk", qk, np.asarray(rot, np.float64))
    return np.concatenate([proj, -proj], -1)


def buckets_from_rotations(qk, rotations):
    """(B, H, R, L) buckets; rotations: list of (D, R, n/2) arrays."""
    total, stride = 0, 1
    for rot in rotations:
        idx = np.argmax(_rotated(qk, rot), -1)
        total = total + stride * idx
        stride *= 2 * rot.shape[-1]
    return total, stride


def hash_margins(qk, rotations):
    """(B, H, R, L): the smallest gap, over the bucket factors, between the
    best and the second best score, relative to the best. Near 0, float
    rounding may pick another bucket than this float64 reference does."""
    margin = np.inf
    for rot in rotations:
        scores = np.sort(_rotated(qk, rot), -1)
        if scores.shape[-1] < 2:
            continue
        gap = (scores[..., -1] - scores[..., -2]) / np.maximum(np.abs(scores[..., -1]), 1e-30)
        margin = np.minimum(margin, gap)
    return np.broadcast_to(margin, qk.shape[:2] + rotations[0].shape[1:2] + qk.shape[2:3])


def allowed_pairs(buckets, valid, bucket_size, before, after, causal, n_buckets,
                  sliding_window=None, strict=False):
    """Dense (L, L) allowed mask for one round from its (L,) buckets.

    The windows follow the layer's documented rule: padding (invalid)
    positions take a bucket of their own past the last; positions are sorted
    by (bucket, position) and cut into chunks of `bucket_size`. Bidirectional:
    a query sees the chunks [own - before, own + after]. Causal: a query sees
    keys of its own bucket no more than before * bucket_size sorted slots
    back, and never a later position; `strict` (shifted values): never
    itself either. `sliding_window=w`: no key with |query - key| >= w.
    """
    length = buckets.shape[0]
    b = np.where(valid, buckets, n_buckets)
    order = np.lexsort((np.arange(length), b))  # by bucket, then position
    slot = np.empty(length, int)
    slot[order] = np.arange(length)
    chunk = slot // bucket_size
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    if causal:
        ok = (b[:, None] == b[None, :]) & (j <= i)
        ok &= slot[:, None] - slot[None, :] <= before * bucket_size
    else:
        diff = chunk[None, :] - chunk[:, None]
        ok = (diff >= -before) & (diff <= after)
    if sliding_window is not None:
        ok &= np.abs(i - j) < sliding_window
    if strict:
        ok &= i != j
    return ok & valid[None, :]


def shift_matrix(valid):
    """(B, L, L) float: row j picks the next real position after j (none: zeros).

    With shifted values (`value_shift=True`) the key at j brings that value.
    """
    batch, length = valid.shape
    shift = np.zeros((batch, length, length))
    for b in range(batch):
        real = np.flatnonzero(valid[b])
        for j in range(length):
            later = real[real > j]
            if later.size:
                shift[b, j, later[0]] = 1.0
    return shift


def admits_no_later_key(pair, valid):
    """(L, L) query-key mask, (L,) real positions: True when no real query
    may attend to a later real key (the mask asks for the causal rule)."""
    length = valid.shape[0]
    later = np.arange(length)[None, :] > np.arange(length)[:, None]
    return not np.any(pair & later & valid[:, None] & valid[None, :])


def allowed_masks(buckets, n_buckets, valid, bucket_size, before=1, after=0,
                  causal=False, sliding_window=None, pair=None, strict=False):
    """(B, H, R, L, L) allowed (query, key) pairs of every head and round.

    `pair`: None or an explicit (B, H, L, L) query-key mask (an MHA
    `attention_mask` broadcast), which also removes keys; a (batch, head)
    whose mask admits no later real key follows the causal rule.
    """
    batch, heads, rounds, length = buckets.shape
    allowed = np.zeros((batch, heads, rounds, length, length), bool)
    for b in range(batch):
        for h in range(heads):
            row_causal = causal or (
                pair is not None and admits_no_later_key(pair[b, h], valid[b]))
            for r in range(rounds):
                allowed[b, h, r] = allowed_pairs(
                    buckets[b, h, r], valid[b], bucket_size, before, after,
                    row_causal, n_buckets, sliding_window, strict)
                if pair is not None:
                    allowed[b, h, r] &= pair[b, h]
    return allowed


def dense_round(qk, v, allowed):
    """Masked shared-QK attention for one head and round: output and lse."""
    keys = qk / np.maximum(np.linalg.norm(qk, axis=-1, keepdims=True), 1e-6)
    logits = qk @ keys.T / np.sqrt(qk.shape[-1])
    length = qk.shape[0]
    logits = np.where(np.eye(length, dtype=bool), SELF, logits)
    logits = np.where(allowed, logits, MASK)
    top = logits.max(-1, keepdims=True)
    lse = top + np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.exp(logits - lse) @ v, lse[:, 0]


def lsh_reference(qk, v, buckets, n_buckets, valid, bucket_size, before=1,
                  after=0, causal=False, sliding_window=None, pair=None,
                  value_shift=False):
    """(B, H, L, E): per-round dense masked attention, rounds combined.

    `value_shift`: keys bring shifted values (`shift_matrix`), a query never
    sees itself, and one with no allowed key in any round outputs zeros.
    """
    allowed = allowed_masks(buckets, n_buckets, valid, bucket_size, before,
                            after, causal, sliding_window, pair, value_shift)
    if value_shift:
        v = np.einsum("bjm,bhme->bhje", shift_matrix(valid), v)
    batch, heads, rounds, _ = buckets.shape
    out = np.zeros(qk.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(heads):
            outs, lses = [], []
            for r in range(rounds):
                o, lse = dense_round(qk[b, h], v[b, h], allowed[b, h, r])
                outs.append(o)
                lses.append(lse)
            lses = np.stack(lses)  # (R, L)
            w = np.exp(lses - lses.max(0))
            w = w / w.sum(0)
            out[b, h] = np.einsum("rl,rle->le", w, np.stack(outs))
    if value_shift:
        out = out * allowed.any(axis=(2, 4))[..., None]
    return out


def full_shared_qk_attention(qk, v, valid, causal):
    """Plain dense shared-QK attention (self masked to -1e5), (B, H, L, E)."""
    batch, heads, length, _ = qk.shape
    out = np.zeros(qk.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        allowed = np.broadcast_to(valid[b][None, :], (length, length))
        if causal:
            allowed = allowed & np.tri(length, dtype=bool)
        for h in range(heads):
            out[b, h] = dense_round(qk[b, h], v[b, h], allowed)[0]
    return out


def dense_lsh_tf(qk, v, allowed, value_shift_matrix=None):
    """`lsh_reference` in float64 TensorFlow (differentiable in qk and v).

    qk (B, H, L, D), v (B, H, L, E) float64 tensors; allowed (B, H, R, L, L)
    bool from `allowed_masks`; `value_shift_matrix` from `shift_matrix`
    (value_shift: shifted values, zeros for a query with no key).
    """
    if value_shift_matrix is not None:
        v = tf.einsum("bjm,bhme->bhje", value_shift_matrix, v)
    keys = qk / tf.norm(qk, axis=-1, keepdims=True)
    logits = tf.einsum("bhld,bhmd->bhlm", qk, keys) / np.sqrt(qk.shape[-1])
    eye = tf.eye(qk.shape[2], dtype=tf.bool)
    logits = tf.where(eye, tf.constant(SELF, tf.float64), logits)
    logits = logits[:, :, None]  # (B, H, 1, L, L) against R rounds
    logits = tf.where(allowed, logits, tf.constant(MASK, tf.float64))
    lse = tf.reduce_logsumexp(logits, -1)  # (B, H, R, L)
    outs = tf.einsum("bhrlm,bhme->bhrle", tf.exp(logits - lse[..., None]), v)
    weights = tf.nn.softmax(lse, axis=2)
    attended = tf.einsum("bhrl,bhrle->bhle", weights, outs)
    if value_shift_matrix is not None:
        attended = attended * np.any(allowed, axis=(2, 4))[..., None]
    return attended


def dense_lsh_loss_tf(weights, x, allowed, target, value_shift_matrix=None):
    """float64 `sum(output * target)` of the whole layer by `dense_lsh_tf`.

    weights: (qk kernel, qk bias, value kernel, value bias, output kernel,
    output bias) float64 tensors, biases None without `use_bias`.
    """
    wq, bq, wv, bv, wo, bo = weights
    qk = tf.einsum("blc,che->bhle", x, wq)
    v = tf.einsum("blc,che->bhle", x, wv)
    if bq is not None:
        qk, v = qk + bq[None, :, None, :], v + bv[None, :, None, :]
    attended = dense_lsh_tf(qk, v, allowed, value_shift_matrix)
    out = tf.einsum("bhle,heo->blo", attended, wo)
    if bo is not None:
        out = out + bo
    return tf.reduce_sum(out * target)
