"""LocalAttention against keras.layers.MultiHeadAttention with the same
weights and a band mask built from positions: the window rule written out
as a dense (T, T) mask, independent of the layer's chunking."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src import testing

from keras_reformer.layers import LocalAttention


def band(length, chunk, before, after, causal):
    """(T, T) bool: key k is in query q's window (and not later, if causal)."""
    q = np.arange(length)[:, None] // chunk
    k = np.arange(length)[None, :] // chunk
    allowed = (k >= q - before) & (k <= q + after)
    if causal:
        allowed &= np.arange(length)[None, :] <= np.arange(length)[:, None]
    return allowed


def twins(features=12, heads=3, key_dim=4, **kwargs):
    """A LocalAttention and a MultiHeadAttention holding the same weights."""
    local = LocalAttention(heads, key_dim, seed=1, **kwargs)
    mha = keras.layers.MultiHeadAttention(heads, key_dim)
    x = np.zeros((1, 5, features), "float32")
    local(x)
    mha(x, x)
    mha.set_weights(local.get_weights())
    return local, mha


def reference(mha, x, allowed):
    """MHA's output under `allowed` (B, T, T); rows with no allowed key are
    left to the caller (MHA spreads them over every key)."""
    return np.asarray(mha(x, x, attention_mask=allowed))


CASES = [  # length, chunk, before, after, causal
    (37, 8, 1, 0, True),
    (37, 8, 2, 1, False),
    (64, 16, 1, 1, True),
    (5, 8, 1, 1, False),  # one chunk, shorter than it
    (24, 8, 0, 0, True),  # chunk alone
]


@pytest.mark.parametrize("length,chunk,before,after,causal", CASES)
@pytest.mark.parametrize("masks", ["none", "padding", "attention_mask"])
def test_equals_multi_head_attention_with_band_mask(length, chunk, before, after,
                                                    causal, masks):
    rng = np.random.default_rng(length + chunk)
    local, mha = twins(chunk_length=chunk, num_chunks_before=before,
                       num_chunks_after=after)
    x = rng.normal(size=(2, length, 12)).astype("float32")
    allowed = np.broadcast_to(band(length, chunk, before, after, causal),
                              (2, length, length)).copy()
    kwargs = {}
    if masks == "padding":
        padding = np.ones((2, length), bool)
        padding[1, length - 3:] = False
        padding[0, 1] = False
        kwargs["query_mask"] = padding
        allowed &= padding[:, None, :]
    elif masks == "attention_mask":
        given = rng.random((2, length, length)) > 0.3
        kwargs["attention_mask"] = given
        allowed &= given
    got = np.asarray(local(x, use_causal_mask=causal, **kwargs))
    want = reference(mha, x, allowed)
    rows = allowed.any(-1)
    np.testing.assert_allclose(got[rows], want[rows], atol=2e-5)
    # A query with no allowed key attends to nothing: the output bias.
    bias = local.get_weights()[-1]
    np.testing.assert_allclose(got[~rows], np.broadcast_to(bias, got[~rows].shape),
                               atol=1e-6)


def test_whole_window_equals_unmasked_attention():
    local, mha = twins(chunk_length=4, num_chunks_before=3, num_chunks_after=3)
    x = np.random.default_rng(0).normal(size=(2, 16, 12)).astype("float32")
    np.testing.assert_allclose(local(x), mha(x, x), atol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_compiled_equals_eager(jit):
    local, mha = twins(chunk_length=8)
    x = np.random.default_rng(1).normal(size=(3, 30, 12)).astype("float32")
    run = tf.function(lambda t: local(t, use_causal_mask=True), jit_compile=jit)
    want = reference(mha, x, np.broadcast_to(band(30, 8, 1, 0, True), (3, 30, 30)))
    np.testing.assert_allclose(run(x), want, atol=2e-5)


def test_unknown_length_in_graph_mode():
    local, mha = twins(chunk_length=8)
    run = tf.function(lambda t: local(t, use_causal_mask=True),
                      input_signature=[tf.TensorSpec((None, None, 12))])
    for length in (3, 21):
        x = np.random.default_rng(length).normal(size=(2, length, 12)).astype("float32")
        want = reference(mha, x, np.broadcast_to(band(length, 8, 1, 0, True),
                                                 (2, length, length)))
        np.testing.assert_allclose(run(x), want, atol=2e-5)


def test_gradients_equal_multi_head_attention():
    local, mha = twins(chunk_length=8, num_chunks_before=1, num_chunks_after=1)
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 20, 12)), tf.float32)
    allowed = np.broadcast_to(band(20, 8, 1, 1, False), (2, 20, 20))
    cotangent = tf.constant(np.random.default_rng(3).normal(size=(2, 20, 12)), tf.float32)

    def grads(call, layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(call() * cotangent)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    got = grads(lambda: local(x), local)
    want = grads(lambda: mha(x, x, attention_mask=allowed), mha)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5)


def test_padding_at_the_end_leaves_real_outputs_alone():
    layer = LocalAttention(2, 4, chunk_length=8, seed=3)
    x = np.random.default_rng(4).normal(size=(1, 19, 12)).astype("float32")
    longer = np.concatenate([x, np.random.default_rng(5).normal(size=(1, 13, 12))], 1)
    mask = np.arange(32)[None] < 19
    short = np.asarray(layer(x, use_causal_mask=False))
    padded = np.asarray(layer(longer.astype("float32"), query_mask=mask))
    np.testing.assert_allclose(padded[:, :19], short, atol=1e-5)


def test_causal_outputs_ignore_later_tokens():
    layer = LocalAttention(2, 4, chunk_length=4, num_chunks_after=2, seed=3)
    x = np.random.default_rng(6).normal(size=(1, 23, 12)).astype("float32")
    changed = x.copy()
    changed[:, 10:] = np.random.default_rng(7).normal(size=(1, 13, 12))
    a = np.asarray(layer(x, use_causal_mask=True))
    b = np.asarray(layer(changed, use_causal_mask=True))
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3


@pytest.mark.parametrize("chunk,before,prompt", [(4, 1, 6), (4, 2, 1), (3, 0, 7)])
def test_cached_decoding_equals_the_full_pass(chunk, before, prompt):
    layer = LocalAttention(2, 4, chunk_length=chunk, num_chunks_before=before, seed=3)
    length = 17
    x = np.random.default_rng(8).normal(size=(2, length, 12)).astype("float32")
    full = np.asarray(layer(x, use_causal_mask=True))
    # Row 1's prompt is two tokens shorter (right-padded).
    mask = np.arange(prompt)[None, :] < np.array([[prompt], [max(prompt - 2, 0)]])
    cache = layer.init_cache(tf.constant(x[:, :prompt]), tf.constant(mask))
    position = mask.sum(1).astype("int32")
    steps = [[] for _ in range(2)]
    while position.max() < length:
        at = np.minimum(position, length - 1)
        token = x[np.arange(2), at][:, None]
        out, cache = layer.call_with_cache(tf.constant(token), cache, tf.constant(at))
        for row in range(2):
            if position[row] < length:
                steps[row].append((position[row], np.asarray(out)[row, 0]))
        position = position + 1
    for row in range(2):
        for at, out in steps[row]:
            np.testing.assert_allclose(out, full[row, at], atol=2e-5)


def test_dropout_in_training_only_and_replayed_by_seed_state():
    layer = LocalAttention(2, 4, chunk_length=4, dropout=0.5, seed=3)
    x = np.random.default_rng(9).normal(size=(1, 12, 12)).astype("float32")
    inference = np.asarray(layer(x))
    np.testing.assert_allclose(layer(x, training=False), inference)
    state = keras.ops.convert_to_numpy(layer.seed_generator.state)
    first = np.asarray(layer(x, training=True))
    assert np.abs(first - inference).max() > 1e-3
    layer.seed_generator.state.assign(state)
    np.testing.assert_allclose(layer(x, training=True), first)


def test_mixed_precision_runs_in_float32_inside():
    layer = LocalAttention(2, 4, chunk_length=4, seed=3, dtype="mixed_float16")
    x = np.random.default_rng(10).normal(size=(2, 12, 12)).astype("float32")
    out = layer(x, use_causal_mask=True)
    assert out.dtype == "float16"
    reference_layer = LocalAttention(2, 4, chunk_length=4, seed=3)
    reference_layer(x)
    reference_layer.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(out, "float32"),
                               reference_layer(x, use_causal_mask=True), atol=2e-2)


def test_config_round_trip_gives_the_same_outputs():
    layer = LocalAttention(2, 4, value_dim=3, chunk_length=5, num_chunks_before=2,
                           num_chunks_after=1, dropout=0.1, use_bias=False,
                           output_shape=7, seed=11)
    x = np.random.default_rng(11).normal(size=(2, 13, 6)).astype("float32")
    out = layer(x)
    clone = LocalAttention.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x), out)
    assert clone.get_config() == layer.get_config()
    assert out.shape == (2, 13, 7)


def test_saved_in_a_keras_file(tmp_path):
    inputs = keras.Input((None, 6))
    outputs = LocalAttention(2, 4, chunk_length=4, seed=2)(inputs, use_causal_mask=True)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(12).normal(size=(2, 9, 6)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kwargs,name", [
    (dict(chunk_length=0), "chunk_length"),
    (dict(num_chunks_before=-1), "num_chunks_before"),
    (dict(num_chunks_after=1.5), "num_chunks_after"),
    (dict(dropout=1.0), "dropout"),
    (dict(use_bias="yes"), "use_bias"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LocalAttention(2, 4, **kwargs)


def test_refuses_what_it_does_not_do():
    layer = LocalAttention(2, 4, chunk_length=4)
    x = np.zeros((1, 8, 6), "float32")
    with pytest.raises(ValueError, match="self-attention"):
        layer(x, np.ones((1, 8, 6), "float32"))
    with pytest.raises(ValueError, match="return_attention_scores"):
        layer(x, return_attention_scores=True)
    with pytest.raises(ValueError, match="query_shape"):
        LocalAttention(2, 4)(np.zeros((1, 2, 8, 6), "float32"))


class LayerTest(testing.TestCase):
    def test_keras_layer_contract(self):
        self.run_layer_test(
            LocalAttention,
            init_kwargs=dict(num_heads=2, key_dim=4, chunk_length=4, dropout=0.1,
                             seed=5),
            input_shape=(2, 10, 6),
            call_kwargs=dict(use_causal_mask=True),
            expected_output_shape=(2, 10, 6),
            expected_num_trainable_weights=8,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=1,
            supports_masking=True,
        )
