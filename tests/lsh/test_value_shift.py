"""Shifted values (`LSHAttention(value_shift=True)`) against brute force.

The reference reads the buckets, takes for each query every strictly
earlier real key of its bucket (the windows here cover every bucket), the
value of the next real position after each key, and combines the rounds by
their softmax mass; a query with no such key in any round outputs zeros.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_reformer as kr
from keras_reformer.lsh.chunk_attention import ChunkSettings, attend
from keras_reformer.lsh.sorting import sort_order
from keras_reformer.lsh.value_shift import shifted_values

B, H, L, D, R, K, C = 2, 2, 32, 8, 2, 4, 16


def brute_force(q, v, buckets, valid):
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(q.shape[0]):
        real = np.flatnonzero(valid[b])
        for h in range(q.shape[1]):
            k = q[b, h] / np.linalg.norm(q[b, h], axis=-1, keepdims=True)
            for i in real:
                outs, lses = [], []
                for r in range(buckets.shape[2]):
                    keys = [j for j in real if j < i and buckets[b, h, r, j] == buckets[b, h, r, i]]
                    if not keys:
                        continue
                    logits = np.array([q[b, h, i] @ k[j] for j in keys]) / np.sqrt(q.shape[-1])
                    top = logits.max()
                    p = np.exp(logits - top)
                    lses.append(top + np.log(p.sum()))
                    after = [real[real > j][0] for j in keys]  # next real position
                    outs.append((p / p.sum()) @ v[b, h, after])
                if outs:
                    w = np.exp(np.array(lses) - max(lses))
                    out[b, h, i] = sum(wi * o for wi, o in zip(w / w.sum(), outs))
    return out


@pytest.mark.parametrize("holes", [False, True])
def test_strict_causal_shifted_attention_matches_brute_force(holes):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, H, L, D)).astype("float32")
    v = rng.normal(size=(B, H, L, D)).astype("float32")
    buckets = rng.integers(0, K, (B, H, R, L)).astype("int32")
    valid = np.ones((B, L), bool)
    if holes:
        valid[1, [5, 6, 20]] = False
        valid[0, -3:] = False
    valid_t = tf.constant(valid)
    out = attend(
        tf.constant(q), shifted_values(tf.constant(v), valid_t),
        sort_order(tf.constant(buckets), valid_t, K), valid_t,
        # reach 32: whole buckets
        ChunkSettings(bucket_size=C, chunks_before=2, causal=True, strict=True),
    ).numpy()
    ref = brute_force(q, v, buckets, valid)
    real = valid[:, None, :, None]
    np.testing.assert_allclose(out * real, ref * real, atol=1e-5)
    assert (np.abs(ref).sum(-1) == 0).sum() > 0  # some queries have no key


def model(**kwargs):
    return kr.models.ReformerModel(
        64, num_layers=2, hidden_dim=32, num_heads=2, bucket_size=8,
        max_sequence_length=64, value_shift=True, seed=1, **kwargs)


def test_value_shift_model_is_causal_and_padding_free():
    m = model(short_convolution=3)
    x = np.random.default_rng(0).integers(0, 64, (2, 64))
    ones = np.ones_like(x)
    y = np.array(m({"token_ids": x, "padding_mask": ones}))
    later = x.copy()
    later[:, 40:] = (later[:, 40:] + 5) % 64
    y_later = np.array(m({"token_ids": later, "padding_mask": ones}))
    np.testing.assert_allclose(y[:, :40], y_later[:, :40], atol=1e-6)
    assert np.abs(y[:, 40:] - y_later[:, 40:]).max() > 1e-3
    mask = ones.copy()
    mask[:, 50:] = 0
    padded = x.copy()
    padded[:, 50:] = 7
    y_padded = np.array(m({"token_ids": padded, "padding_mask": mask}))
    np.testing.assert_allclose(y[:, :50], y_padded[:, :50], atol=1e-6)


def test_value_shift_argument_errors():
    with pytest.raises(ValueError, match="value_shift=True.*causal=False"):
        kr.models.ReformerModel(64, causal=False, value_shift=True)
    with pytest.raises(ValueError, match="value_shift"):
        kr.layers.LSHAttention(2, 8, value_shift="yes")
    layer = kr.layers.LSHAttention(2, 8, bucket_size=4, value_shift=True)
    with pytest.raises(ValueError, match="use_causal_mask=True"):
        layer(np.zeros((1, 16, 8), "float32"))
    assert kr.layers.LSHAttention.from_config(layer.get_config()).value_shift
