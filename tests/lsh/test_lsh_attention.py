"""LSHAttention against dense references, masks, randomness and Keras plumbing."""

import itertools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import LSHAttention
from tests.lsh import lsh_reference as ref

FEATURES = 12


def make_layer(**kwargs):
    args = dict(num_heads=2, key_dim=8, bucket_size=8, num_hashes=2, seed=3)
    args.update(kwargs)
    layer = LSHAttention(**args)
    layer.build((None, None, FEATURES))
    return layer


def inputs(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, FEATURES)).astype("float32")


def padding_mask(batch, length, seed=0):
    """Random padding: a ragged tail per row plus one hole in the middle."""
    rng = np.random.default_rng(seed + 100)
    mask = np.ones((batch, length), bool)
    for b in range(batch):
        mask[b, length - rng.integers(0, length // 3 + 1):] = False
        mask[b, rng.integers(0, length)] = False
        mask[b, 0] = True
    return mask


def reference_output(layer, x, valid, factors, causal, num_hashes=None):
    """Dense brute-force output, built from the buckets of the layer's rotations."""
    num_hashes = num_hashes or layer.num_hashes
    qk, v = ref.projections(layer, x)
    length = x.shape[1]
    c = layer.bucket_size
    padded = -(-length // c) * c
    rotations = [np.asarray(r) for r in layer._rotations(factors, num_hashes, False)]
    buckets, n_buckets = ref.buckets_from_rotations(qk, rotations)
    del padded  # the reference needs no internal padding
    attended = ref.lsh_reference(
        qk, v, buckets, n_buckets, valid, c, layer.num_chunks_before,
        layer.num_chunks_after, causal,
    )
    return ref.output_projection(layer, attended)


CASES = [
    # (length, num_hashes, causal, padded, num_buckets)
    (40, 1, False, False, 4),
    (40, 2, True, True, 4),
    (37, 3, False, True, 6),
    (37, 4, True, False, 4),
    (64, 2, True, True, (2, 4)),
    (61, 1, True, True, 8),
    (61, 4, False, False, (4, 2)),
    (90, 3, True, True, 6),
]


@pytest.mark.parametrize("length,num_hashes,causal,padded,num_buckets", CASES)
def test_matches_brute_force_reference(length, num_hashes, causal, padded,
                                       num_buckets):
    layer = make_layer(num_hashes=num_hashes, num_buckets=num_buckets)
    x = inputs(2, length, seed=length)
    valid = padding_mask(2, length, seed=length) if padded else np.ones(
        (2, length), bool
    )
    out = layer(x, use_causal_mask=causal, query_mask=valid if padded else None)
    factors = num_buckets if isinstance(num_buckets, tuple) else (num_buckets,)
    expected = reference_output(layer, x, valid, factors, causal)
    got = np.asarray(out)
    np.testing.assert_allclose(got[valid], expected[valid], atol=2e-5, rtol=1e-4)


def test_matches_reference_with_wider_window():
    layer = make_layer(num_chunks_before=2, num_chunks_after=1, num_buckets=6)
    x = inputs(1, 70)
    valid = np.ones((1, 70), bool)
    expected = reference_output(layer, x, valid, (6,), causal=False)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=2e-5, rtol=1e-4)


def built_for(length, **kwargs):
    args = dict(num_heads=2, key_dim=8, bucket_size=8, num_hashes=2, seed=3)
    args.update(kwargs)
    layer = LSHAttention(**args)
    layer.build((None, length, FEATURES))
    return layer


def test_derived_bucket_count_and_factorization():
    # Built for 96 positions, bucket 8: 24 buckets (2 * 96 / 8); above 16 it
    # factorizes into two hashes of 6 and 4 buckets (even, product >= 24).
    x = inputs(1, 96)
    valid = np.ones((1, 96), bool)
    plain = built_for(96)
    assert plain.resolved_num_buckets == 24
    np.testing.assert_allclose(
        np.asarray(plain(x)), reference_output(plain, x, valid, (24,), False),
        atol=2e-5, rtol=1e-4,
    )
    factored = built_for(96, factorize_above=16)
    assert factored.resolved_num_buckets == (6, 4)
    np.testing.assert_allclose(
        np.asarray(factored(x)),
        reference_output(factored, x, valid, (6, 4), False),
        atol=2e-5, rtol=1e-4,
    )
    # max_length wins over the build length; unknown length: 2048 positions.
    assert built_for(96, max_length=200).resolved_num_buckets == 50
    assert built_for(None, factorize_above=1024).resolved_num_buckets == 512
    # The count is fixed at build: a longer (padded) call keeps it.
    longer = np.concatenate([x, inputs(1, 40, seed=2)], axis=1)
    mask = np.arange(136)[None] < 96
    np.testing.assert_allclose(
        np.asarray(plain(longer, query_mask=mask))[:, :96],
        np.asarray(plain(x)), atol=1e-5,
    )


@pytest.mark.parametrize(
    "length,kwargs,causal",
    [
        (8, {}, False),  # exactly one chunk
        (5, {}, False),  # padded inside the layer to one chunk
        (24, {"num_chunks_before": 2, "num_chunks_after": 2}, False),
    ],
)
def test_single_window_is_full_shared_qk_attention(length, kwargs, causal):
    # Non-causal only: there the dense shortcut is exact (see the next test).
    layer = make_layer(num_hashes=3, **kwargs)
    x = inputs(2, length)
    valid = np.ones((2, length), bool)
    qk, v = ref.projections(layer, x)
    expected = ref.output_projection(
        layer, ref.full_shared_qk_attention(qk, v, valid, causal)
    )
    got = np.asarray(layer(x, use_causal_mask=causal))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_no_change_of_meaning_around_two_buckets(causal):
    # The non-causal dense shortcut (one window covers everything) and the
    # causal rule (own bucket, never dense) both agree with the brute-force
    # LSH reference at, below and above 2 * bucket_size.
    for length in (8, 15, 16, 17, 24):
        layer = built_for(None, num_buckets=4, num_hashes=2)
        x = inputs(2, length, seed=length)
        valid = np.ones((2, length), bool)
        expected = reference_output(layer, x, valid, (4,), causal)
        got = np.asarray(layer(x, use_causal_mask=causal))
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_causal_outputs_never_depend_on_later_tokens(training):
    layer = make_layer(num_hashes=4, bucket_size=4, num_buckets=4)
    rng = np.random.default_rng(7)
    x = inputs(2, 53, seed=1)
    state = np.asarray(layer.seed_generator.state)
    base = None
    for trial in range(6):
        t = int(rng.integers(0, 52))
        changed = x.copy()
        changed[:, t + 1:] = rng.normal(size=changed[:, t + 1:].shape)
        outs = []
        for inp in (x, changed):
            layer.seed_generator.state.assign(state)  # same rotations
            outs.append(np.asarray(layer(inp, use_causal_mask=True, training=training)))
        np.testing.assert_allclose(outs[0][:, : t + 1], outs[1][:, : t + 1], atol=1e-6)
        # The change must be visible after t, or the test proves nothing.
        assert np.abs(outs[0][:, t + 1:] - outs[1][:, t + 1:]).max() > 1e-3
        base = outs[0] if base is None else base


@pytest.mark.parametrize("causal,num_buckets", [(False, 4), (True, 6), (True, None)])
def test_appended_padding_never_changes_real_outputs(causal, num_buckets):
    layer = make_layer(num_buckets=num_buckets, num_hashes=3)
    x = inputs(2, 37)
    # The derived count comes from the build length (unknown here: the
    # default), never from the padded length of a batch.
    extra = 25
    longer = np.concatenate([x, inputs(2, extra, seed=9) * 5], axis=1)
    mask = np.concatenate([np.ones((2, 37), bool), np.zeros((2, extra), bool)], 1)
    short = np.asarray(layer(x, use_causal_mask=causal))
    long = np.asarray(layer(longer, use_causal_mask=causal, query_mask=mask))
    np.testing.assert_allclose(long[:, :37], short, atol=1e-5)
    assert np.all(np.isfinite(long))


def test_keras_padding_mask_from_embedding():
    ids = np.array([[5, 3, 9, 2, 7, 1, 4, 6, 8, 2, 0, 0, 0],
                    [4, 4, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    inp = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(10, FEATURES, mask_zero=True)
    attention = LSHAttention(num_heads=2, key_dim=8, bucket_size=4, seed=1)
    out = attention(emb(inp), use_causal_mask=True)
    model = keras.Model(inp, out)
    got = np.asarray(model(ids))
    embedded = np.asarray(emb(ids))
    explicit = np.asarray(
        attention(embedded, query_mask=ids != 0, use_causal_mask=True)
    )
    np.testing.assert_allclose(got, explicit, atol=1e-6)
    # Whatever sits at padded positions never reaches real outputs.
    noisy = embedded.copy()
    noisy[ids == 0] = np.random.default_rng(0).normal(size=noisy[ids == 0].shape)
    again = np.asarray(attention(noisy, query_mask=ids != 0, use_causal_mask=True))
    np.testing.assert_allclose(again[ids != 0], got[ids != 0], atol=1e-6)
    assert np.all(np.isfinite(got))
    # The mask propagates to the output, symbolically and eagerly.
    assert out._keras_mask is not None
    eager = attention(emb(ids), use_causal_mask=True)
    np.testing.assert_array_equal(np.asarray(eager._keras_mask), ids != 0)


def test_attention_mask_forms_agree():
    layer = make_layer(num_buckets=4)
    x = inputs(2, 30)
    valid = padding_mask(2, 30)
    # MHA's forms of a key padding mask: (B, 1, S), (B, T, S), (B, H, T, S).
    a = np.asarray(layer(x, query_mask=valid))
    b = np.asarray(layer(x, attention_mask=valid[:, None, :]))
    c = np.asarray(layer(x, attention_mask=np.repeat(valid[:, None, :], 30, 1)))
    d = np.asarray(layer(x, attention_mask=np.broadcast_to(valid[:, None, None, :], (2, 2, 30, 30))))
    for other in (b, c, d):
        np.testing.assert_allclose(a[valid], other[valid], atol=1e-6)


def test_pairwise_attention_mask_matches_reference():
    layer = make_layer(num_buckets=4, num_hashes=2)
    length = 40
    x = inputs(1, length)
    rng = np.random.default_rng(4)
    pair = rng.random((1, length, length)) > 0.3
    got = np.asarray(layer(x, attention_mask=pair))
    qk, v = ref.projections(layer, x)
    rotations = [np.asarray(r) for r in layer._rotations((4,), 2, False)]
    buckets, n = ref.buckets_from_rotations(qk, rotations)
    valid = np.ones(length, bool)
    attended = np.zeros(qk.shape[:3] + (v.shape[-1],))
    for h in range(2):
        outs, lses = [], []
        for r in range(2):
            allowed = ref.allowed_pairs(buckets[0, h, r], valid, 8, 1, 0, False, n)
            o, lse = ref.dense_round(qk[0, h], v[0, h], allowed & pair[0])
            outs.append(o)
            lses.append(lse)
        w = np.exp(np.stack(lses) - np.max(lses, 0))
        w /= w.sum(0)
        attended[0, h] = np.einsum("rl,rle->le", w, np.stack(outs))
    np.testing.assert_allclose(got, ref.output_projection(layer, attended), atol=2e-5)


def test_fully_masked_rows_are_finite():
    layer = make_layer(num_buckets=4)
    x = inputs(2, 20)
    mask = np.zeros((2, 20), bool)
    mask[0, :3] = True
    out = np.asarray(layer(x, query_mask=mask, use_causal_mask=True))
    assert np.all(np.isfinite(out))
    pair = np.zeros((2, 20, 20), bool)
    assert np.all(np.isfinite(np.asarray(layer(x, attention_mask=pair))))


def test_inference_is_deterministic_eager_graph_and_jit():
    layer = make_layer(num_hashes=3)
    x = inputs(2, 100)
    eager = np.asarray(layer(x, use_causal_mask=True))
    again = np.asarray(layer(x, use_causal_mask=True))
    np.testing.assert_array_equal(eager, again)
    fn = lambda t: layer(t, use_causal_mask=True)  # noqa: E731
    jit = np.asarray(tf.function(fn, jit_compile=True)(x))
    graph = np.asarray(
        tf.function(fn, input_signature=[tf.TensorSpec([None, None, FEATURES])])(x)
    )
    np.testing.assert_allclose(jit, eager, atol=1e-5)
    np.testing.assert_allclose(graph, eager, atol=1e-6)


def test_training_draws_fresh_rotations():
    layer = make_layer(num_hashes=1)
    x = inputs(1, 120)
    a = np.asarray(layer(x, training=True))
    b = np.asarray(layer(x, training=True))
    assert np.abs(a - b).max() > 1e-3
    fn = tf.function(lambda t: layer(t, training=True), jit_compile=True)
    assert np.abs(np.asarray(fn(x)) - np.asarray(fn(x))).max() > 1e-3


def test_num_hashes_can_change_after_training():
    layer = make_layer(num_hashes=1, num_buckets=4)
    x = inputs(1, 50)
    weights = [np.asarray(w) for w in layer.weights]
    valid = np.ones((1, 50), bool)
    got = np.asarray(layer(x, num_hashes=3))
    np.testing.assert_allclose(
        got, reference_output(layer, x, valid, (4,), False, num_hashes=3), atol=2e-5
    )
    layer.num_hashes = 4
    np.testing.assert_allclose(
        np.asarray(layer(x)), reference_output(layer, x, valid, (4,), False),
        atol=2e-5,
    )
    for before, after in zip(weights, layer.weights):
        np.testing.assert_array_equal(before, np.asarray(after))
    with pytest.raises(ValueError, match="num_hashes"):
        layer.num_hashes = 0


def test_multi_head_attention_call_forms():
    layer = make_layer()
    x = tf.constant(inputs(2, 30))
    a = np.asarray(layer(x))
    np.testing.assert_array_equal(a, np.asarray(layer(x, x)))
    np.testing.assert_array_equal(a, np.asarray(layer(query=x, value=x)))
    np.testing.assert_array_equal(a, np.asarray(layer(x, x, x)))
    with pytest.raises(ValueError, match="Cross-attention"):
        layer(x, tf.constant(inputs(2, 30, seed=5)))
    with pytest.raises(ValueError, match="return_attention_scores"):
        layer(x, return_attention_scores=True)


def test_swap_for_multi_head_attention_in_functional_model():
    def build(attention_cls):
        inp = keras.Input((None, FEATURES))
        out = attention_cls(num_heads=2, key_dim=8, dropout=0.1)(
            inp, inp, use_causal_mask=True
        )
        return keras.Model(inp, out)

    mha = build(keras.layers.MultiHeadAttention)
    lsh = build(LSHAttention)
    assert [w.shape for w in mha.weights if "key" not in w.path] == [
        w.shape for w in lsh.trainable_weights
    ]


def test_gradients_reach_every_weight():
    layer = make_layer(dropout=0.1, num_buckets=4)
    x = tf.constant(inputs(2, 50))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.square(layer(x, training=True, use_causal_mask=True)))
    grads = tape.gradient(loss, [x] + layer.trainable_variables)
    assert len(layer.trainable_variables) == 6
    for g in grads:
        assert g is not None and np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_gradients_match_brute_force():
    """Autodiff through sort/gather equals the gradient of the dense reference."""
    layer = make_layer(num_buckets=4, num_hashes=2)
    x = inputs(1, 32)
    valid = np.ones((1, 32), bool)
    target = np.random.default_rng(0).normal(size=(1, 32, FEATURES))
    with tf.GradientTape() as tape:
        out = layer(x, use_causal_mask=True)
        loss = tf.reduce_sum(out * target)
    grad = tape.gradient(loss, layer.output_dense.kernel)
    # d loss / d W_o = sum over positions of attended^T target, from the reference.
    qk, v = ref.projections(layer, x)
    rotations = [np.asarray(r) for r in layer._rotations((4,), 2, False)]
    buckets, n = ref.buckets_from_rotations(qk, rotations)
    attended = ref.lsh_reference(qk, v, buckets, n, valid, 8, 1, 0, True)
    expected = np.einsum("bhle,blo->heo", attended, target)
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-4, rtol=1e-4)


def test_fit_with_jit_lowers_loss():
    keras.utils.set_random_seed(0)
    length = 64
    inp = keras.Input((length, FEATURES))
    h = LSHAttention(num_heads=2, key_dim=8, bucket_size=16, seed=0)(
        inp, use_causal_mask=True
    )
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=True)
    x = inputs(16, length)
    # Target: running mean of the first feature (needs attention to earlier tokens).
    y = np.cumsum(x[..., :1], axis=1) / np.arange(1, length + 1)[None, :, None]
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=15, batch_size=8, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.7 * before


def test_config_round_trip():
    layer = LSHAttention(
        num_heads=3, key_dim=4, value_dim=5, dropout=0.2, use_bias=False,
        output_shape=7, bucket_size=16, num_hashes=3, num_buckets=(4, 6),
        num_chunks_before=2, num_chunks_after=1, factorize_above=64,
        kernel_initializer="he_normal", kernel_regularizer="l2", seed=11,
        name="lsh",
    )
    config = layer.get_config()
    clone = LSHAttention.from_config(config)
    assert clone.get_config() == config
    for key in ("num_heads", "key_dim", "value_dim", "dropout", "use_bias",
                "output_shape", "bucket_size", "num_hashes", "num_buckets",
                "num_chunks_before", "num_chunks_after", "factorize_above",
                "seed"):
        assert key in config
    assert config["num_buckets"] == (4, 6) and config["output_shape"] == (7,)
    # A seed drawn at construction is stored, so a clone hashes the same way.
    auto = LSHAttention(num_heads=1, key_dim=4)
    assert isinstance(auto.get_config()["seed"], int)


def test_keras_file_round_trip(tmp_path):
    inp = keras.Input((None, FEATURES))
    out = LSHAttention(num_heads=2, key_dim=8, bucket_size=8, num_hashes=3)(
        inp, use_causal_mask=True
    )
    model = keras.Model(inp, out)
    x = inputs(2, 75)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x = inputs(2, 60)
    reference = make_layer(num_buckets=4)
    want = np.asarray(reference(x, use_causal_mask=True))
    try:
        keras.config.set_dtype_policy(policy)
        layer = make_layer(num_buckets=4)
        layer.set_weights(reference.get_weights())
        mask = padding_mask(2, 60)
        out = layer(x, use_causal_mask=True, query_mask=mask)
        assert out.dtype == policy.split("_")[1]
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        # Measured (3 seeds): float16 mean error ~1.8e-4; bfloat16 1.3e-3 to
        # 1.8e-2 (its 8-bit mantissa moves a few positions to another bucket).
        tol = 1e-3 if policy == "mixed_float16" else 0.05
        plain = np.asarray(layer(x, use_causal_mask=True), np.float32)
        assert np.abs(plain - want).mean() < tol
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_buckets": 3}, "num_buckets"),
        ({"num_buckets": 0}, "num_buckets"),
        ({"num_buckets": -4}, "num_buckets"),
        ({"num_buckets": (4, 5)}, "num_buckets"),
        ({"num_buckets": (4, 4, 4)}, "num_buckets"),
        ({"bucket_size": 0}, "bucket_size"),
        ({"num_hashes": 0}, "num_hashes"),
        ({"num_heads": 0}, "num_heads"),
        ({"key_dim": -1}, "key_dim"),
        ({"dropout": 1.5}, "dropout"),
        ({"num_chunks_before": -1}, "num_chunks_before"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = dict(num_heads=2, key_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        LSHAttention(**args)
    assert repr(list(kwargs.values())[0]) in str(info.value)


def test_bad_shapes():
    layer = LSHAttention(num_heads=2, key_dim=8)
    with pytest.raises(ValueError, match="rank >= 3"):
        layer(tf.zeros((2, 10)))
    layer = make_layer()
    with pytest.raises(ValueError, match="attention_mask"):
        layer(tf.zeros((2, 10, FEATURES)), attention_mask=tf.ones((3, 10, 10)))
    built = make_layer()
    with pytest.raises(Exception, match=str(FEATURES)):
        built(tf.zeros((2, 10, FEATURES + 1)))


def test_compute_output_shape():
    layer = LSHAttention(num_heads=2, key_dim=8, output_shape=5)
    assert layer.compute_output_shape((None, 30, 12)) == (None, 30, 5)
    inp = keras.Input((None, 12))
    assert LSHAttention(num_heads=2, key_dim=8)(inp).shape == (None, None, 12)


def test_combination_of_all_small_settings_is_finite():
    for before, after, causal in itertools.product([0, 1, 2], [0, 1], [False, True]):
        layer = make_layer(num_chunks_before=before, num_chunks_after=after)
        out = np.asarray(layer(inputs(1, 45), use_causal_mask=causal))
        assert np.all(np.isfinite(out)), (before, after, causal)


def test_saved_model_is_deterministic_for_any_length(tmp_path):
    inp = keras.Input((None, FEATURES))
    out = LSHAttention(num_heads=2, key_dim=8, bucket_size=8, num_hashes=2,
                       factorize_above=4)(inp, use_causal_mask=True)
    model = keras.Model(inp, out)
    path = os.path.join(tmp_path, "sm")
    model.export(path, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)
    # Built for an unknown length: the default bucket count, factorized (> 4).
    for length in (6, 100):
        x = inputs(2, length, seed=length)
        first = np.asarray(loaded.serve(x))
        np.testing.assert_array_equal(first, np.asarray(loaded.serve(x)))
        np.testing.assert_allclose(first, np.asarray(model(x)), atol=1e-5)
