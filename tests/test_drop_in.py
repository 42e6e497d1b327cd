"""Everyday Keras use: padding never changes real outputs, masks reach the
layers after attention, weights reload with the same hashing."""

import keras
import numpy as np
import pytest

import keras_reformer as kr
from keras_reformer.layers import LSHAttention
from keras_reformer.models import ReformerBackbone, ReformerCausalLM


def ids_batch(length, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 40, size=(2, length)).astype("int32")


def padded(ids, extra):
    return np.concatenate([ids, np.zeros((ids.shape[0], extra), "int32")], axis=1)


# Each round count once in the default run, causal and not alternating; the
# other three pairs under -m slow (layer-level padding invariance is also a
# property test, tests/lsh/test_properties.py).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("num_hashes, causal", [
    (1, True), (2, False), (4, True),
    pytest.param(1, False, marks=SLOW), pytest.param(2, True, marks=SLOW),
    pytest.param(4, False, marks=SLOW),
])
def test_reformer_model_padding_invariance(causal, num_hashes):
    model = ReformerBackbone(vocabulary_size=40, num_layers=1, hidden_dim=16, num_heads=2,
                             intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
                             num_hashes=num_hashes, causal=causal,
                             max_sequence_length=256, seed=3)
    if causal:  # the language model's logits; an encoder's hidden states
        model = ReformerCausalLM(model)
    ids = ids_batch(100, num_hashes)
    short = model.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0)
    long_ids = padded(ids, 100)
    long = model.predict({"token_ids": long_ids,
                          "padding_mask": (np.arange(200) < 100)[None].repeat(2, 0).astype("int32")},
                         verbose=0)
    np.testing.assert_allclose(long[:, :100], short, atol=1e-4)
    assert (long[:, :100].argmax(-1) == short.argmax(-1)).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_hashes", [1, 2, 4])
def test_pooling_after_lsh_attention_ignores_padding(causal, num_hashes):
    # The README's model: Embedding(mask_zero) -> LSHAttention -> pooling.
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(40, 16, mask_zero=True)(tokens)
    x = LSHAttention(num_heads=2, key_dim=8, bucket_size=8, num_hashes=num_hashes,
                     seed=2)(x, x, use_causal_mask=causal)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, pooled)
    ids = ids_batch(50, 7)
    short = model.predict(ids, verbose=0)
    long = model.predict(padded(ids, 78), verbose=0)
    np.testing.assert_allclose(long, short, atol=1e-5)
    # Independent reference: the mean of the attention outputs at real positions.
    seq = keras.Model(tokens, x)
    outs = np.asarray(seq(padded(ids, 78)))[:, :50]
    np.testing.assert_allclose(long, outs.mean(1), atol=1e-5)


def test_rnn_after_lsh_attention_skips_padding():
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(40, 16, mask_zero=True)(tokens)
    x = LSHAttention(num_heads=2, key_dim=8, bucket_size=8, seed=2)(x, x)
    model = keras.Model(tokens, keras.layers.GRU(4)(x))
    ids = ids_batch(30, 1)
    np.testing.assert_allclose(model.predict(padded(ids, 20), verbose=0),
                               model.predict(ids, verbose=0), atol=1e-5)


def test_readme_example_trains():
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(300, 32, mask_zero=True)(tokens)
    x = kr.layers.LSHAttention(num_heads=4, key_dim=8)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))
    model.compile("adam", "sparse_categorical_crossentropy")
    ids = padded(ids_batch(20, 3), 12)
    history = model.fit(ids, np.array([0, 1]), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_save_weights_load_weights_reproduces_predictions(tmp_path):
    def build():  # seed=None: every build draws another hashing seed
        tokens = keras.Input((None, 12))
        out = LSHAttention(num_heads=2, key_dim=8, bucket_size=4, num_buckets=8)(
            tokens, use_causal_mask=True)
        return keras.Model(tokens, out)

    x = np.random.default_rng(0).normal(size=(2, 64, 12)).astype("float32")
    first = build()
    want = first.predict(x, verbose=0)
    path = str(tmp_path / "lsh.weights.h5")
    first.save_weights(path)
    second = build()
    assert not np.allclose(second.predict(x, verbose=0), want, atol=1e-3)
    second.load_weights(path)
    np.testing.assert_allclose(second.predict(x, verbose=0), want, atol=1e-6)


def test_feed_forward_block_callable_activation_round_trips():
    from keras_reformer.layers.reformer_blocks import FeedForwardBlock

    block = FeedForwardBlock(8, activation=keras.activations.relu, seed=1)
    clone = FeedForwardBlock.from_config(block.get_config())
    assert clone.activation is keras.activations.relu
    x = np.random.default_rng(0).normal(size=(1, 4, 6)).astype("float32")
    block(x), clone(x)
    clone.set_weights(block.get_weights())
    # Independent check that the activation acts: relu output of the FFN.
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(block(x)), atol=1e-6)
    string = FeedForwardBlock.from_config(FeedForwardBlock(8, activation="gelu").get_config())
    assert string.activation is keras.activations.gelu
