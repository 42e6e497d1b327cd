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


def parts_and_reference(shape=(2, 24, 16), widths=(10, 6), mode="eager"):
    """Our LayerNorm on the parts of an input (a list) against Keras' on
    their concatenation: outputs and gradients for each part and weight."""
    rng = np.random.default_rng(2)
    parts = [tf.constant(rng.normal(1.0, 2.0, size=shape[:-1] + (w,)), tf.float32)
             for w in widths]
    upstream = tf.constant(rng.normal(size=shape[:-1] + (sum(widths),)), tf.float32)
    gamma = rng.normal(1.0, 0.5, size=(sum(widths),)).astype("float32")
    beta = rng.normal(0.0, 0.5, size=(sum(widths),)).astype("float32")
    results = []
    for cls, concat in ((keras.layers.LayerNormalization, True), (LayerNorm, False)):
        layer = cls(epsilon=1e-6)
        layer.build(shape[:-1] + (sum(widths),))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

        def run(layer=layer, concat=concat):
            with tf.GradientTape() as tape:
                tape.watch(parts)
                out = layer(tf.concat(parts, -1) if concat else parts)
                loss = tf.reduce_sum(out * upstream)
            return [out] + tape.gradient(loss, parts + [layer.gamma.value,
                                                        layer.beta.value])

        if mode != "eager":
            run = tf.function(run, jit_compile=mode == "xla")
        results.append([np.asarray(t) for t in run()])
    return results


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_parts_equal_keras_on_the_concatenation(mode):
    keras_side, ours = parts_and_reference(mode=mode)
    assert ours[0].shape == (2, 24, 16)
    for a, b in zip(keras_side, ours):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["graph", "xla"])
@pytest.mark.parametrize("widths", [(10, 6), (16,)])
def test_gradient_in_slices_of_rows(monkeypatch, mode, widths):
    # 48 rows in slices of 16: the loop of the gradient for long inputs.
    from keras_reformer.ops import layer_norm as module

    monkeypatch.setattr(module, "GRADIENT_ROWS", 16)
    assert module._slice_rows(48) == 16
    keras_side, ours = parts_and_reference(widths=widths, mode=mode)
    for a, b in zip(keras_side, ours):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_parts_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    a = tf.constant(rng.normal(size=(3, 4)), tf.float64)
    b = tf.constant(rng.normal(size=(3, 2)), tf.float64)
    gamma = tf.constant(rng.normal(size=(6,)), tf.float64)
    beta = tf.constant(rng.normal(size=(6,)), tf.float64)
    weights = tf.constant(rng.normal(size=(3, 6)), tf.float64)

    def f(a, b, gamma, beta):
        return tf.reduce_sum(tf.sin(layer_norm([a, b], gamma, beta, 1e-6)) * weights)

    theoretical, numerical = tf.test.compute_gradient(f, [a, b, gamma, beta])
    for t, n in zip(theoretical, numerical):
        # (central differences: their own error is ~1e-6 here)
        np.testing.assert_allclose(t, n, rtol=1e-5, atol=1e-6)


def test_parts_mask_and_shape():
    # A position is kept where every part keeps it (as Concatenate does).
    layer = LayerNorm()
    x1 = keras.Input((5, 3))
    x2 = keras.Input((5, 4))
    assert layer([x1, x2]).shape == (None, 5, 7)
    m1 = tf.constant([[True, True, False]])
    m2 = tf.constant([[True, False, False]])
    np.testing.assert_array_equal(layer.compute_mask(None, [m1, m2]),
                                  [[True, False, False]])
    assert layer.compute_mask(None, [None, None]) is None
