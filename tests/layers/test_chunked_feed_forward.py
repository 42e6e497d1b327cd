"""ChunkedFeedForward against a plain Dense -> activation -> Dense network."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ChunkedFeedForward

FEATURES = 6


@pytest.fixture(autouse=True)
def fixed_initial_weights():
    keras.utils.set_random_seed(4321)


def make_layer(**kwargs):
    args = dict(intermediate_dim=20, chunk_size=8, seed=5)
    args.update(kwargs)
    layer = ChunkedFeedForward(**args)
    layer.build((None, None, FEATURES))
    # Non-zero biases, so that a bias mistake shows.
    for dense in (layer.intermediate_dense, layer.output_dense):
        if dense.use_bias:
            dense.bias.assign(np.linspace(-0.5, 0.5, dense.bias.shape[0]))
    return layer


def reference(layer, x, activation=keras.activations.gelu):
    """The unchunked network, written out with numpy-like tf ops."""
    w1 = tf.convert_to_tensor(layer.intermediate_dense.kernel)
    w2 = tf.convert_to_tensor(layer.output_dense.kernel)
    h = tf.einsum("bld,df->blf", x, w1)
    if layer.use_bias:
        h = h + layer.intermediate_dense.bias
    h = activation(h)
    y = tf.einsum("blf,fd->bld", h, w2)
    if layer.use_bias:
        y = y + layer.output_dense.bias
    return y


def inputs(batch, length, seed=0, dtype="float32"):
    return np.random.default_rng(seed).normal(size=(batch, length, FEATURES)).astype(dtype)


def weighted_loss(y):
    # Position- and feature-dependent weights: every output element matters.
    if y.dtype in (tf.float16, tf.bfloat16):
        y = tf.cast(y, tf.float32)
    length, width = y.shape[1], y.shape[2]
    w = tf.reshape(tf.sin(tf.range(length * width, dtype=y.dtype) * 0.37),
                   (1, length, width))
    return tf.reduce_sum(y * w)


def grads(fn, layer, x, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = weighted_loss(fn(x, **kwargs))
    return [loss] + tape.gradient(loss, [x] + layer.trainable_variables)


def wrap(mode, fn):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "jit"))


def assert_close(actual, expected, rtol=1e-5, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = max(np.max(np.abs(expected)), 1e-6)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("length", [1, 7, 8, 16, 21])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_equals_unchunked(length, activation):
    layer = make_layer(activation=activation)
    x = tf.constant(inputs(2, length))
    act = keras.activations.get(activation)
    assert_close(layer(x), reference(layer, x, act), what="output")
    assert_close(layer(x, training=True), reference(layer, x, act),
                 what="training, no dropout")


@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
@pytest.mark.parametrize("length", [5, 16, 19])
def test_gradients_equal_unchunked(mode, length):
    layer = make_layer()
    x = tf.constant(inputs(2, length, seed=length))
    ours = wrap(mode, lambda a: grads(layer, layer, a, training=True))(x)
    ref = wrap(mode, lambda b: grads(lambda y: reference(layer, y), layer, b))(x)
    names = ["loss", "x"] + [v.path for v in layer.trainable_variables]
    assert len(ours) == len(ref) == 2 + 4
    for name, a, b in zip(names, ours, ref):
        assert a is not None, name
        assert_close(a, b, what=f"{mode} {name}")


def test_no_bias_and_output_dim():
    layer = make_layer(use_bias=False, output_dim=3)
    x = tf.constant(inputs(1, 11))
    assert len(layer.trainable_variables) == 2
    assert layer(x).shape == (1, 11, 3)
    assert layer.compute_output_shape((1, 11, FEATURES)) == (1, 11, 3)
    assert_close(layer(x), reference(layer, x))
    a = tf.function(lambda v: grads(layer, layer, v))(x)
    b = tf.function(lambda v: grads(lambda y: reference(layer, y), layer, v))(x)
    for u, w in zip(a, b):
        assert_close(u, w)


def test_unchunked_mode_equals_reference():
    layer = make_layer(chunk_size=None)
    x = tf.constant(inputs(2, 13))
    assert_close(layer(x), reference(layer, x))


def test_dynamic_length_and_batch():
    layer = make_layer()
    fn = tf.function(
        lambda v: layer(v),
        input_signature=[tf.TensorSpec((None, None, FEATURES), tf.float32)],
    )
    for batch, length in [(1, 3), (3, 17), (2, 24)]:
        x = tf.constant(inputs(batch, length))
        assert_close(fn(x), reference(layer, x), what=f"{batch}x{length}")


def test_dropout_replayed_and_gradient_exact():
    """With dropout, the custom gradient is the gradient of the forward pass.

    In float64, a central finite difference of the loss along a random
    direction (seed state reset before every evaluation, so all three
    evaluations use the same masks) must match the analytic derivative.
    """
    layer = make_layer(dropout=0.4, dtype="float64", chunk_size=4)
    state = layer.seed_generator.state
    start = state.numpy()
    x = tf.constant(inputs(2, 10, dtype="float64"))
    v = tf.constant(inputs(2, 10, seed=9, dtype="float64"))

    @tf.function
    def loss_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = weighted_loss(layer(x, training=True))
        return loss, tape.gradient(loss, x)

    state.assign(start)
    loss, g = loss_and_grad(x)
    assert not np.array_equal(state.numpy(), start)  # the state advanced
    eps = 1e-5
    state.assign(start)
    plus, _ = loss_and_grad(x + eps * v)
    state.assign(start)
    minus, _ = loss_and_grad(x - eps * v)
    numeric = (plus - minus) / (2 * eps)
    analytic = tf.reduce_sum(g * v)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    # Dropout really happened (else this test would prove nothing).
    state.assign(start)
    assert not np.allclose(layer(x, training=True), reference(layer, x))
    state.assign(start)
    first = layer(x, training=True)
    state.assign(start)
    np.testing.assert_array_equal(first, layer(x, training=True))
    assert not np.array_equal(first, layer(x, training=True))  # fresh masks


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    layer = make_layer(dtype=policy)
    x = tf.constant(inputs(2, 19))
    y = layer(x)
    assert y.dtype == layer.compute_dtype
    assert layer.intermediate_dense.kernel.dtype == "float32"
    tol = 2e-2 if policy == "mixed_bfloat16" else 5e-3
    assert_close(tf.cast(y, "float32"), reference(layer, x), rtol=tol)
    g = tf.function(lambda a: grads(layer, layer, a))(x)
    r = tf.function(lambda b: grads(lambda u: reference(layer, u), layer, b))(x)
    for a, b in zip(g[1:], r[1:]):
        assert a.dtype == b.dtype
        assert_close(tf.cast(a, "float32"), tf.cast(b, "float32"), rtol=5 * tol)


def test_config_round_trip():
    layer = make_layer(activation="relu", dropout=0.1, chunk_size=3,
                       kernel_regularizer="l2", output_dim=4)
    config = layer.get_config()
    clone = ChunkedFeedForward.from_config(config)
    assert clone.get_config() == config
    clone.build((None, None, FEATURES))
    clone.set_weights(layer.get_weights())
    x = tf.constant(inputs(1, 7))
    assert_close(clone(x), layer(x))
    assert clone.seed == layer.seed


def test_keras_file_round_trip(tmp_path):
    inp = keras.Input((None, FEATURES))
    out = ChunkedFeedForward(12, chunk_size=4, dropout=0.2, seed=1)(inp)
    model = keras.Model(inp, out)
    path = os.path.join(tmp_path, "ffn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = inputs(2, 9)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    assert isinstance(loaded.layers[-1], ChunkedFeedForward)


def test_mask_passes_through():
    emb = keras.layers.Embedding(10, FEATURES, mask_zero=True)
    ids = np.array([[1, 2, 3, 0, 0]])
    y = make_layer()(emb(ids))
    np.testing.assert_array_equal(y._keras_mask, ids != 0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"intermediate_dim": 0}, "intermediate_dim"),
        ({"intermediate_dim": 8.0}, "intermediate_dim"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"output_dim": -2}, "output_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": "0.1"}, "dropout"),
        ({"use_bias": "no"}, "use_bias"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**30}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = dict(intermediate_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{name}` must .*Received: {name}="):
        ChunkedFeedForward(**args)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="shape"):
        ChunkedFeedForward(8).build((None, FEATURES))


@pytest.mark.parametrize("initializer", [
    "glorot_uniform", keras.initializers.RandomNormal(seed=11),
])
def test_kernels_do_not_share_values(initializer):
    # Keras initializers draw the same numbers on every call; one instance
    # for both kernels made the output kernel a reshaped copy of the first.
    layer = ChunkedFeedForward(FEATURES, kernel_initializer=initializer)
    layer.build((None, None, FEATURES))
    first = np.ravel(layer.intermediate_dense.kernel)
    second = np.ravel(layer.output_dense.kernel)
    assert not np.allclose(first, second)
    # A seeded initializer still gives the same weights every time.
    again = ChunkedFeedForward(FEATURES, kernel_initializer=initializer)
    again.build((None, None, FEATURES))
    if not isinstance(initializer, str):
        np.testing.assert_array_equal(np.ravel(again.output_dense.kernel), second)
