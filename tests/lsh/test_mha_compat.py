"""Keras' MultiHeadAttention tests (keras 3.15, multi_head_attention_test.py),
self-attention cases, run on LSHAttention and on MultiHeadAttention as the
control: each property must hold for the control too, or the test is wrong.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

from keras_reformer.layers import LSHAttention

CLASSES = [layers.MultiHeadAttention, LSHAttention]


def make(cls, **kwargs):
    if cls is LSHAttention:
        kwargs.setdefault("bucket_size", 4)
        kwargs.setdefault("seed", 1)
    return cls(**kwargs)


def out_of(layer, x, **kwargs):
    return np.asarray(layer(x, x, **kwargs))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "q_dims,mask_dims,axes",
    [
        ((3, 4), (4, 4), (2,)),
        ((3, 4), (3, 4, 4), (2,)),
        ((3, 4), None, (2,)),
        ((3, 4), (3, 4, 3, 4), (1, 2)),
        ((5, 3, 4), None, (2, 3)),
        ((5, 3, 4), (3, 5, 3, 4, 3, 4), (2, 3)),
    ],
)
@pytest.mark.parametrize("use_gate", [False, True])
def test_high_dim_attention(cls, q_dims, mask_dims, axes, use_gate):
    shape = (3,) + q_dims + (8,)
    layer = make(cls, num_heads=2, key_dim=2, attention_axes=axes, use_gate=use_gate)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    mask = None if mask_dims is None else np.random.default_rng(1).random(mask_dims) > 0.3
    assert layer(x, x, attention_mask=mask).shape == shape
    assert len(layer.trainable_weights) == (10 if use_gate else 8) - (
        2 if cls is LSHAttention else 0)  # shared QK: no key projection


def test_high_dim_attention_is_attention_over_the_folded_axes():
    # Independent check of the folding: attention over axis 2 of (B, X, T, F)
    # equals rank-3 attention of the (B * X, T, F) input with the same weights.
    x = np.random.default_rng(0).normal(size=(2, 3, 20, 8)).astype("float32")
    high = make(LSHAttention, num_heads=2, key_dim=4, attention_axes=2)
    flat = make(LSHAttention, num_heads=2, key_dim=4)
    got = np.asarray(high(x, use_causal_mask=True))
    flat(x.reshape(6, 20, 8))
    flat.set_weights(high.get_weights())
    want = np.asarray(flat(x.reshape(6, 20, 8), use_causal_mask=True)).reshape(got.shape)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("use_gate", [False, True])
def test_attention_axes_negative_indexing(cls, use_gate):
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 4)).astype("float32")
    pos = make(cls, num_heads=2, key_dim=4, attention_axes=2, use_gate=use_gate)
    neg = make(cls, num_heads=2, key_dim=4, attention_axes=-2, use_gate=use_gate)
    pos(x, x), neg(x, x)
    neg.set_weights(pos.get_weights())
    np.testing.assert_allclose(out_of(pos, x), out_of(neg, x), atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "shape,output_shape",
    [((4, 8), None), ((4, 8), (3, 4)), ((4, 2, 3, 8), None), ((4, 8), 5)],
)
def test_compute_output_shape(cls, shape, output_shape):
    axes = (1, 2) if len(shape) == 4 else None
    layer = make(cls, num_heads=2, key_dim=2, output_shape=output_shape,
                 attention_axes=axes)
    x = np.ones((2,) + shape, "float32")
    out = layer(x, x)
    tail = (shape[-1],) if output_shape is None else (
        (output_shape,) if isinstance(output_shape, int) else output_shape)
    assert out.shape == (2,) + shape[:-1] + tail
    assert layer.compute_output_shape((2,) + shape, (2,) + shape) == out.shape


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_heads": 0, "key_dim": 2}, "argument `num_heads`"),
        ({"num_heads": 2, "key_dim": -1}, "argument `key_dim`"),
        ({"num_heads": 2, "key_dim": 2, "value_dim": 0}, "argument `value_dim`"),
        ({"num_heads": 2, "key_dim": 2, "sliding_window": 0}, "sliding_window"),
        ({"num_heads": 2, "key_dim": 2, "attention_axes": "x"}, "attention_axes"),
        ({"num_heads": 2, "key_dim": 2, "output_shape": 3.5}, "Invalid `output_shape`"),
    ],
)
def test_invalid_scalar_args_rejected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer = make(cls, **kwargs)
        x = np.ones((1, 4, 8), "float32")
        layer(x, x)


@pytest.mark.parametrize("cls", CLASSES)
def test_initializer(cls):
    layer = make(cls, num_heads=12, key_dim=64,
                 kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02))
    x = np.ones((1, 4, 16), "float32")
    layer(x, x)
    kernels = [w for w in layer.trainable_weights if "kernel" in w.path]
    assert not np.allclose(np.asarray(kernels[0]), np.asarray(kernels[1]))


@pytest.mark.parametrize("cls", CLASSES)
def test_query_mask_propagation(cls):
    layer = make(cls, num_heads=2, key_dim=2)
    assert layer.supports_masking
    query = np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2], [1, 0, 0, 0, 0]])
    masked = layers.Embedding(4, 8, mask_zero=True)(query)
    out = layer(query=masked, value=masked)
    np.testing.assert_array_equal(np.asarray(out._keras_mask), query != 0)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("causal", [True, False])
def test_masking(cls, causal):
    """The Keras mask and the causal flag equal the explicit mask."""
    layer = make(cls, num_heads=2, key_dim=2)
    query = np.array([[1, 2, 3, 0, 0], [3, 3, 1, 1, 2], [1, 0, 0, 0, 0]])
    masked = layers.Embedding(4, 8, mask_zero=True)(query)
    auto = np.asarray(layer(query=masked, value=masked, use_causal_mask=causal))
    valid = query != 0
    mask = valid[:, :, None] & valid[:, None, :]
    if causal:
        mask = mask & np.tri(5, dtype=bool)
    plain = ops.convert_to_tensor(np.asarray(masked))
    manual = np.asarray(layer(query=plain, value=plain, attention_mask=mask))
    # Outputs of padded queries are unspecified (both layers mask them).
    np.testing.assert_allclose(auto[valid], manual[valid], atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_masking_with_different_shapes(cls):
    x = np.random.default_rng(0).random((2, 5, 8)).astype("float32")
    mask = np.tril(np.ones((5, 5)))
    layer = make(cls, num_heads=2, key_dim=4)
    one = out_of(layer, x, attention_mask=mask)
    two = out_of(layer, x, attention_mask=np.tile(mask[None], (2, 1, 1)))
    three = out_of(layer, x, attention_mask=np.tile(mask[None, None], (2, 2, 1, 1)))
    np.testing.assert_allclose(one, two, atol=1e-6)
    np.testing.assert_allclose(one, three, atol=1e-6)
    # A lower-triangular mask is causal: the same as use_causal_mask=True.
    np.testing.assert_allclose(one, out_of(layer, x, use_causal_mask=True), atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_causal_with_other_mask_is_their_conjunction(cls):
    x = np.random.default_rng(0).random((2, 5, 8)).astype("float32")
    mask = np.random.default_rng(1).random((2, 5, 5)) > 0.3
    mask |= np.eye(5, dtype=bool)
    layer = make(cls, num_heads=2, key_dim=4)
    np.testing.assert_allclose(
        out_of(layer, x, use_causal_mask=True, attention_mask=mask),
        out_of(layer, x, attention_mask=mask & np.tri(5, dtype=bool)), atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(cls, causal):
    # Within one LSH chunk (6 <= 8 positions) the window is the only limit:
    # changing token j changes output i only if |i - j| < 3 (and j <= i).
    layer = make(cls, num_heads=2, key_dim=4, sliding_window=3,
                 **({"bucket_size": 8} if cls is LSHAttention else {}))
    x = np.random.default_rng(0).normal(size=(1, 6, 8)).astype("float32")
    base = out_of(layer, x, use_causal_mask=causal)
    for j in range(6):
        other = x.copy()
        other[0, j] += 1.0
        changed = np.abs(out_of(layer, other, use_causal_mask=causal) - base).max(-1)[0]
        for i in range(6):
            seen = abs(i - j) < 3 and (j <= i or not causal)
            if cls is LSHAttention and causal:
                # The causal rule adds its own limit (same bucket), so
                # inside the window a key may still be out of reach.
                assert seen or changed[i] <= 1e-6, (i, j)
            else:
                assert (changed[i] > 1e-6) == seen, (i, j)


@pytest.mark.parametrize("cls", CLASSES)
def test_sliding_window_serialization(cls):
    layer = make(cls, num_heads=2, key_dim=4, sliding_window=3)
    assert cls.from_config(layer.get_config()).get_config()["sliding_window"] == 3


@pytest.mark.parametrize("cls", CLASSES)
def test_constraints(cls):
    layer = make(cls, num_heads=2, key_dim=2, kernel_constraint="non_neg",
                 bias_constraint="non_neg")
    x = np.ones((1, 4, 8), "float32")
    layer(x, x)
    for w in layer.trainable_weights:
        assert w.constraint is not None, w.path


@pytest.mark.parametrize("cls", CLASSES)
def test_output_shape_as_int_and_tuple(cls):
    x = np.ones((2, 4, 8), "float32")
    assert make(cls, num_heads=2, key_dim=2, output_shape=8)(x, x).shape == (2, 4, 8)
    assert make(cls, num_heads=2, key_dim=2, output_shape=(2, 4))(x, x).shape == (2, 4, 2, 4)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kind", ["numpy", "float64", "mixed"])
def test_same_input_twice_is_self_attention(cls, kind):
    x = np.random.default_rng(0).random((2, 6, 8))
    policy = "mixed_float16" if kind == "mixed" else None
    try:
        if policy:
            keras.config.set_dtype_policy(policy)
        layer = make(cls, num_heads=2, key_dim=4)
        x = x.astype("float64") if kind == "float64" else x.astype("float32")
        if kind == "float64":
            x = ops.convert_to_tensor(x)
        assert layer(x, x).shape == (2, 6, 8)
    finally:
        keras.config.set_dtype_policy("float32")
