"""ops.dropout: the stateless mask shared by attention and feed-forward dropout."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.ops.dropout import dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_mask_values_fraction_and_replay(rate):
    seed = tf.constant([5, 9], tf.int32)
    mask = keep_mask([200, 300], rate, seed).numpy()
    scale = 1.0 / (1.0 - rate)
    # Only 0 or 1 / (1 - rate), so the expected value of x * mask is x.
    assert set(np.unique(mask)) <= {0.0, np.float32(scale)}
    assert abs((mask == 0).mean() - rate) < 0.01  # 60,000 draws: std ~0.002
    np.testing.assert_array_equal(mask, keep_mask([200, 300], rate, seed).numpy())
    assert not np.array_equal(mask, keep_mask([200, 300], rate, seed + [0, 1]).numpy())


def test_dropout_scales_kept_values_and_zeroes_the_rest():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype("float32")
    seed = tf.constant([3, 4], tf.int32)
    out = dropout(tf.constant(x), 0.25, seed).numpy()
    kept = keep_mask([8, 16], 0.25, seed).numpy() > 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-6)
    assert np.all(out[~kept] == 0)


def test_the_mask_is_the_same_in_every_mode():
    # Recomputations may run in another mode than the pass they replay
    # (e.g. an eager call of a layer traced elsewhere): one mask for all.
    seed = tf.constant([7, -3], tf.int32)
    eager = keep_mask([33, 65], 0.3, seed).numpy()
    for jit in (False, True):
        fn = tf.function(lambda s: keep_mask([33, 65], 0.3, s), jit_compile=jit)
        np.testing.assert_array_equal(fn(seed).numpy(), eager)


def test_masks_look_independent():
    # Against a brute-force expectation of independent draws: neighbouring
    # positions, rows, and seeds one apart are uncorrelated, and every
    # row keeps about 1 - rate.
    seeds = [tf.constant([1, s], tf.int32) for s in range(4)]
    masks = np.stack([keep_mask([256, 256], 0.5, s).numpy() > 0 for s in seeds])
    m = masks.astype("float64") - 0.5
    for a, b in [(m[:, :, 1:], m[:, :, :-1]), (m[:, 1:], m[:, :-1]), (m[1:], m[:-1])]:
        assert abs((a * b).mean()) / 0.25 < 0.02  # 65K+ pairs: std ~0.004
    assert np.abs(masks.mean(axis=2) - 0.5).max() < 0.15  # 256 per row: std 0.03
