"""ShortConvolution against a NumPy loop; masks, decode steps, config, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ShortConvolution


def reference(x, kernel, bias, causal, mask):
    """Explicit windows: zeros outside the sequence and on padding."""
    x = x * mask[..., None]
    width = kernel.shape[0]
    first = -(width - 1) if causal else -((width - 1) // 2)
    out = np.zeros(x.shape[:2] + (kernel.shape[2],)) + bias
    for t in range(x.shape[1]):
        for k in range(width):
            s = t + first + k
            if 0 <= s < x.shape[1]:
                out[:, t] += x[:, s] @ kernel[k]
    return out


@pytest.mark.parametrize("width,causal", [(1, True), (3, True), (4, False), (5, False)])
def test_matches_numpy_windows_with_padding(width, causal):
    rng = np.random.default_rng(width)
    x = rng.normal(size=(2, 11, 6)).astype(np.float32)
    mask = np.ones((2, 11), np.float32)
    mask[1, 7:] = 0
    layer = ShortConvolution(width, causal=causal)
    layer.build(x.shape)
    layer.bias.assign(rng.normal(size=6).astype(np.float32))
    got = np.asarray(layer(x, mask=mask > 0))
    want = reference(x, np.asarray(layer.kernel), np.asarray(layer.bias), causal, mask)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_last_position_is_one_causal_decode_step():
    x = np.random.default_rng(0).normal(size=(3, 9, 4)).astype(np.float32)
    layer = ShortConvolution(3)
    full = np.asarray(layer(x))
    for t in range(9):
        window = np.zeros((3, 3, 4), np.float32)
        for k in range(3):
            if t - 2 + k >= 0:
                window[:, k] = x[:, t - 2 + k]
        np.testing.assert_allclose(np.asarray(layer.last_position(tf.constant(window))),
                                   full[:, t], atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        ShortConvolution(3, causal=False).last_position(tf.zeros((1, 3, 4)))


def test_mixed_precision_and_config_round_trip():
    layer = ShortConvolution(2, causal=False, dtype="mixed_float16", name="conv")
    out = layer(np.ones((1, 5, 8), np.float32))
    assert out.dtype == "float16" and layer.kernel.dtype == "float32"
    clone = ShortConvolution.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.width, clone.causal) == (2, False)


@pytest.mark.parametrize("kwargs,name", [({"width": 0}, "width"), ({"width": 1.5}, "width"),
                                         ({"width": 2, "causal": "yes"}, "causal")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ShortConvolution(**kwargs)


def test_unknown_feature_size_is_an_error():
    with pytest.raises(ValueError, match="feature size"):
        ShortConvolution(2).build((None, None, None))


def test_gradients_reach_the_kernel_in_a_model():
    inputs = keras.Input((7, 4))
    model = keras.Model(inputs, ShortConvolution(3)(inputs))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(np.ones((1, 7, 4), np.float32)) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
