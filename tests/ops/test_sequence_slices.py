"""ops.sequence_slices.chunked_value_and_vjp against plain autodiff of the whole tensor."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.ops import sequence_slices
from keras_reformer.ops.dropout import dropout

FEATURES, HIDDEN = 6, 10


def params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(FEATURES, HIDDEN), (HIDDEN, FEATURES), (HIDDEN,), (FEATURES,)]
    return [tf.constant(rng.normal(size=s).astype("float32") * 0.5) for s in shapes]


def ffn(x, p, index=None):
    """Position-wise: the same function on a slice or on the whole tensor."""
    return tf.matmul(tf.tanh(tf.matmul(x, p[0]) + p[2]), p[1]) + p[3]


def wrap(mode, fn):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "jit"))


def data(length, seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(2, length, FEATURES)).astype("float32"))
    dy = tf.constant(rng.normal(size=(2, length, FEATURES)).astype("float32"))
    return x, dy


def assert_close(actual, expected, rtol=1e-5, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
@pytest.mark.parametrize("length", [13, 16, 3])  # ragged, exact, one slice
def test_value_and_vjp_equals_autodiff(mode, length):
    p = params()
    x, dy = data(length)

    def reference(x, dy):
        with tf.GradientTape() as tape:
            tape.watch([x] + p)
            y = ffn(x, p)
        return [y] + tape.gradient(y, [x] + p, output_gradients=dy)

    def fused(x, dy):
        y, dx, dp = sequence_slices.chunked_value_and_vjp(ffn, x, dy, p, chunk_size=4)
        return [y, dx] + dp

    expected = reference(x, dy)
    got = wrap(mode, fused)(x, dy)
    names = ["y", "dx", "dw1", "dw2", "db1", "db2"]
    for name, a, e in zip(names, got, expected):
        assert_close(a, e, what=name)


def test_dynamic_length_in_graph_mode():
    p = params()
    fused = tf.function(
        lambda x, dy: sequence_slices.chunked_value_and_vjp(ffn, x, dy, p, chunk_size=4),
        input_signature=[tf.TensorSpec([None, None, FEATURES])] * 2,
    )
    for length in (5, 12):
        x, dy = data(length)
        y, dx, _ = fused(x, dy)
        with tf.GradientTape() as tape:
            tape.watch(x)
            ref = ffn(x, p)
        assert_close(y, ref, what="y")
        assert_close(dx, tape.gradient(ref, x, output_gradients=dy), what="dx")


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_slice_index_reaches_fn_as_in_chunked_map(mode):
    """A per-slice dropout (as ChunkedFeedForward draws it): the fused pass
    sees the slice numbers chunked_map's forward saw, so equals its output
    and its tape gradient."""
    p = params()
    x, dy = data(13)
    seed = tf.constant([3, 4])

    def dropped(xs, p, index):
        h = tf.tanh(tf.matmul(xs, p[0]) + p[2])
        h = dropout(h, 0.5, sequence_slices.slice_seed(seed, index))
        return tf.matmul(h, p[1]) + p[3]

    def by_chunked_map(x, dy):
        with tf.GradientTape() as tape:
            tape.watch([x] + p)
            y = sequence_slices.chunked_map(dropped, x, p, 4)
        return [y] + tape.gradient(y, [x] + p, output_gradients=dy)

    def fused(x, dy):
        y, dx, dp = sequence_slices.chunked_value_and_vjp(dropped, x, dy, p, 4)
        return [y, dx] + dp

    expected = wrap(mode, by_chunked_map)(x, dy)
    got = wrap(mode, fused)(x, dy)
    for a, e in zip(got, expected):
        assert_close(a, e)
    # The dropout was on: without it the output differs.
    assert np.abs(np.asarray(expected[0]) - np.asarray(ffn(x, p))).max() > 1e-2
