"""Brute-force LSH attention in NumPy, for checking the chunked layer.

Everything here is dense (length x length) and written from the paper (Kitaev et al., 2020),
sharing no code with keras_reformer.lsh: hashing is argmax([xR; -xR]) on the
layer's own rotations (the only thing taken from the layer, as they are its
random source), allowed pairs are built from the buckets per round, and the
rounds are combined by their logsumexp weights.
"""

import numpy as np

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


def buckets_from_rotations(qk, rotations):
    """(B, H, R, L) buckets; rotations: list of (D, R, n/2) arrays."""
    total, stride = 0, 1
    for rot in rotations:
        proj = np.einsum("bhld,drk->bhrlk", qk, np.asarray(rot, np.float64))
        idx = np.argmax(np.concatenate([proj, -proj], -1), -1)
        total = total + stride * idx
        stride *= 2 * rot.shape[-1]
    return total, stride


def allowed_pairs(buckets, valid, bucket_size, before, after, causal, n_buckets):
    """Dense (L, L) allowed mask for one round from its (L,) buckets.

    The windows follow the layer's documented rule: padding (invalid)
    positions take a bucket of their own past the last; positions are sorted
    by (bucket, position) and cut into chunks of `bucket_size`. Bidirectional:
    a query sees the chunks [own - before, own + after]. Causal: a query sees
    keys of its own bucket no more than before * bucket_size sorted slots
    back, and never a later position.
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
    return ok & valid[None, :]


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
                  after=0, causal=False):
    """(B, H, L, E): per-round dense masked attention, rounds combined."""
    batch, heads, rounds, _ = buckets.shape
    out = np.zeros(qk.shape[:3] + (v.shape[-1],))
    for b in range(batch):
        for h in range(heads):
            outs, lses = [], []
            for r in range(rounds):
                allowed = allowed_pairs(buckets[b, h, r], valid[b], bucket_size,
                                        before, after, causal, n_buckets)
                o, lse = dense_round(qk[b, h], v[b, h], allowed)
                outs.append(o)
                lses.append(lse)
            lses = np.stack(lses)  # (R, L)
            w = np.exp(lses - lses.max(0))
            w = w / w.sum(0)
            out[b, h] = np.einsum("rl,rle->le", w, np.stack(outs))
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
