"""Every input and weight gradient of LSHAttention against a float64 reference.

The reference is dense attention written here in float64 TensorFlow (autodiff,
no code from keras_reformer.lsh): per round, a (L, L) allowed mask built from
the buckets by tests/lsh/lsh_reference.py, masked shared-QK softmax, rounds
combined by their logsumexp weights. Buckets are piecewise constant, so the
gradient flows only through the attention itself, through the sort and
unsort in the layer.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import LSHAttention
from tests.lsh import lsh_reference as ref

FEATURES = 12


@pytest.mark.parametrize(
    "length,num_hashes,causal,padded",
    [(32, 2, True, False), (40, 3, False, True), (29, 4, True, True)],
)
def test_all_gradients_match_float64_reference(length, num_hashes, causal, padded):
    layer = LSHAttention(num_heads=2, key_dim=8, bucket_size=8, num_hashes=num_hashes,
                         num_buckets=4, seed=5)
    layer.build((None, None, FEATURES))
    rng = np.random.default_rng(length)
    x = rng.normal(size=(2, length, FEATURES))
    target = rng.normal(size=(2, length, FEATURES))
    valid = np.ones((2, length), bool)
    if padded:
        valid[1, -7:] = False
    mask = valid if padded else None

    x32 = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x32)
        out = layer(x32, use_causal_mask=causal, query_mask=mask)
        # Outputs at padded positions are unspecified: leave them out.
        loss = tf.reduce_sum(out * tf.constant(target * valid[..., None], tf.float32))
    variables = [layer.qk_dense.kernel, layer.qk_dense.bias,
                 layer.value_dense.kernel, layer.value_dense.bias,
                 layer.output_dense.kernel, layer.output_dense.bias]
    got = tape.gradient(loss, [x32] + variables)

    qk, _ = ref.projections(layer, x)
    rotations = [np.asarray(r) for r in layer._rotations((4,), num_hashes, False)]
    buckets, n = ref.buckets_from_rotations(qk, rotations)
    allowed = np.zeros((2, 2, num_hashes, length, length), bool)
    for b in range(2):
        for h in range(2):
            for r in range(num_hashes):
                allowed[b, h, r] = ref.allowed_pairs(
                    buckets[b, h, r], valid[b], 8, 1, 0, causal, n
                )
    x64 = tf.constant(x)
    weights = [tf.constant(np.asarray(v), tf.float64) for v in variables]
    with tf.GradientTape() as tape:
        tape.watch([x64] + weights)
        loss64 = ref.dense_lsh_loss_tf(weights, x64, allowed, target * valid[..., None])
    want = tape.gradient(loss64, [x64] + weights)

    names = ["x", "qk kernel", "qk bias", "value kernel", "value bias",
             "output kernel", "output bias"]
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w)
        scale = np.abs(w).max()
        assert scale > 0, name
        error = np.abs(g - w).max() / scale
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"
