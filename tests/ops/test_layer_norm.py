"""ops.layer_norm and the blocks' LayerNorm against keras.layers.LayerNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers._layer_norm import LayerNorm
from keras_reformer.ops.layer_norm import layer_norm


def reference_and_ours(dtype="float32", shape=(2, 7, 16), graph=False):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, size=shape), tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    gamma = rng.normal(1.0, 0.5, size=shape[-1:]).astype("float32")
    beta = rng.normal(0.0, 0.5, size=shape[-1:]).astype("float32")
    results = []
    for cls in (keras.layers.LayerNormalization, LayerNorm):
        layer = cls(epsilon=1e-6, dtype=dtype)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

        def run(layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x)
                loss = tf.reduce_sum(tf.cast(out, tf.float32) * upstream)
            return [out] + tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

        results.append(tf.function(run)() if graph else run())
    return results


@pytest.mark.parametrize("graph", [False, True])
def test_output_and_gradients_equal_keras(graph):
    keras_side, ours = reference_and_ours(graph=graph)
    for a, b in zip(keras_side, ours):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_mixed_precision_keeps_dtypes():
    keras_side, ours = reference_and_ours(dtype="mixed_float16")
    assert ours[0].dtype == keras_side[0].dtype == tf.float16
    for a, b in zip(keras_side, ours):
        np.testing.assert_allclose(np.asarray(a, "float32"), np.asarray(b, "float32"),
                                   rtol=2e-2, atol=2e-2)


def test_gradient_matches_finite_differences():
    # float64, independent of Keras: central differences of the function.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, 5)), tf.float64)
    gamma = tf.constant(rng.normal(size=(5,)), tf.float64)
    beta = tf.constant(rng.normal(size=(5,)), tf.float64)
    weights = tf.constant(rng.normal(size=(3, 5)), tf.float64)

    def f(x, gamma, beta):
        return tf.reduce_sum(tf.sin(layer_norm(x, gamma, beta, 1e-6)) * weights)

    theoretical, numerical = tf.test.compute_gradient(f, [x, gamma, beta])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7)


def test_other_axes_fall_back_to_keras():
    layer = LayerNorm(axis=1)
    x = tf.random.normal((2, 3, 4))
    np.testing.assert_allclose(layer(x), keras.layers.LayerNormalization(axis=1)(x),
                               rtol=1e-5, atol=1e-5)
