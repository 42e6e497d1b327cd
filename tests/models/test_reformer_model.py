"""ReformerModel against a hand-wired reference, causality, saving, generate()."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models import ReformerModel

SMALL = dict(vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
             intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
             num_hashes=2, max_sequence_length=128, seed=3)


def batch(ids):
    ids = np.asarray(ids, np.int32)
    return {"token_ids": ids, "padding_mask": (ids != 0).astype(np.int32)}


def random_ids(shape, seed=0, vocab=40):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def hand_wired(model, inputs):
    """The model's math written out with its own sublayers."""
    ids = tf.constant(inputs["token_ids"])
    mask = tf.constant(inputs["padding_mask"] > 0)
    x = model.get_layer("token_embedding")(ids)
    if model.position_embedding:
        x = x + model.get_layer("position_embedding")(x)
    y1 = y2 = x
    for f, g in model.get_layer("reversible_stack").blocks:
        y1 = y1 + f(y2, mask=mask, training=False)
        y2 = y2 + g(y1, training=False)
    h = model.get_layer("final_norm")(tf.concat([y1, y2], -1))
    return np.asarray(model.get_layer("logits")(h) if model.include_head else h)


@pytest.mark.parametrize("causal,position", [(True, "axial"), (False, "sinusoidal"),
                                             (True, None)])
def test_matches_hand_wired_reference(causal, position):
    model = ReformerModel(**SMALL, causal=causal, position_embedding=position,
                          dropout=0.1, attention_dropout=0.1)
    ids = random_ids((2, 45))
    ids[1, 30:] = 0  # padding
    inputs = batch(ids)
    got = np.asarray(model(inputs, training=False))
    want = hand_wired(model, inputs)
    real = inputs["padding_mask"] > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)


def test_causal_logits_never_depend_on_later_tokens():
    model = ReformerModel(**SMALL)
    ids = random_ids((1, 100))
    base = np.asarray(model(batch(ids)))
    rng = np.random.default_rng(1)
    for t in rng.integers(0, 99, size=5):
        changed = ids.copy()
        changed[:, t + 1:] = random_ids((1, 99 - t), seed=int(t) + 10)
        out = np.asarray(model(batch(changed)))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


def test_variable_lengths_and_padding_in_one_model():
    model = ReformerModel(**{**SMALL, "num_buckets": 4})
    long = random_ids((2, 60))
    short = long[:, :37]
    padded = np.concatenate([short, np.zeros((2, 23), np.int32)], axis=1)
    a = np.asarray(model.predict(batch(short), verbose=0))
    b = np.asarray(model.predict(batch(padded), verbose=0))
    np.testing.assert_allclose(b[:, :37], a, atol=1e-5)
    assert np.asarray(model.predict(batch(long), verbose=0)).shape == (2, 60, 40)


def test_fit_with_jit_lowers_loss():
    keras.utils.set_random_seed(0)
    model = ReformerModel(**SMALL)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    # A learnable sequence: each token is the previous one plus one (mod 39).
    start = np.random.default_rng(0).integers(1, 40, size=(16, 1))
    ids = ((start + np.arange(64)) % 39 + 1).astype(np.int32)
    x, y = batch(ids[:, :-1]), ids[:, 1:]
    history = model.fit(x, y, epochs=15, batch_size=4, verbose=0)
    assert history.history["loss"][-1] < 0.6 * history.history["loss"][0]


def test_encoder_feeds_a_functional_classifier(tmp_path):
    encoder = ReformerModel(**SMALL, causal=False, include_head=False)
    assert encoder.output.shape[-1] == 2 * SMALL["hidden_dim"]
    pooled = keras.layers.GlobalAveragePooling1D()(encoder.output)
    classifier = keras.Model(encoder.input, keras.layers.Dense(2)(pooled))
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ids = random_ids((8, 20))
    labels = (ids[:, 0] > 20).astype(np.int32)
    classifier.fit(batch(ids), labels, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "clf.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(batch(ids), verbose=0),
                               classifier.predict(batch(ids), verbose=0), atol=1e-5)


def test_config_round_trip():
    model = ReformerModel(**SMALL, axial_shape=(8, 16), causal=False, reversible=False)
    config = model.get_config()
    clone = ReformerModel.from_config(config)
    assert clone.get_config() == config
    for key in ("vocabulary_size", "num_layers", "hidden_dim", "num_heads", "key_dim",
                "intermediate_dim", "feedforward_chunk_size", "bucket_size",
                "num_hashes", "num_buckets", "dropout", "attention_dropout",
                "max_sequence_length", "axial_shape", "causal", "reversible", "seed"):
        assert key in config


def test_keras_file_round_trip_in_fresh_process(tmp_path):
    model = ReformerModel(**SMALL, dropout=0.1)
    ids = random_ids((2, 50))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    want = np.asarray(model.predict(batch(ids), verbose=0))
    np.save(os.path.join(tmp_path, "ids.npy"), ids)
    code = textwrap.dedent(f"""
        import numpy as np, keras
        import keras_reformer  # registers the classes
        model = keras.saving.load_model({path!r}, safe_mode=True)
        ids = np.load({os.path.join(tmp_path, 'ids.npy')!r})
        out = model.predict({{"token_ids": ids, "padding_mask": np.ones_like(ids)}}, verbose=0)
        np.save({os.path.join(tmp_path, 'out.npy')!r}, out)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    np.testing.assert_array_equal(np.load(os.path.join(tmp_path, "out.npy")), want)


def test_generate_greedy_equals_argmax_by_hand():
    model = ReformerModel(**SMALL)
    prompt = random_ids((2, 6))
    got = model.generate(prompt, 5, temperature=0)
    ids = prompt
    for _ in range(5):
        logits = np.asarray(model(batch(ids)))[:, -1]
        ids = np.concatenate([ids, logits.argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(got, ids)


def test_generate_sampling_is_seeded_and_stops_at_end_token():
    model = ReformerModel(**SMALL)
    prompt = random_ids((3, 4))
    a = model.generate(prompt, 6, temperature=1.0, top_k=5, seed=7)
    b = model.generate(prompt, 6, temperature=1.0, top_k=5, seed=7)
    c = model.generate(prompt, 6, temperature=1.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 10) and not np.array_equal(a, c)
    # top_k=1 is greedy.
    np.testing.assert_array_equal(
        model.generate(prompt, 3, top_k=1, seed=1), model.generate(prompt, 3, temperature=0)
    )
    greedy = model.generate(prompt[:1], 6, temperature=0)
    end = int(greedy[0, 5])  # the second generated token
    stopped = model.generate(prompt[:1], 6, temperature=0, end_token_id=end)
    assert stopped.shape[1] <= 6 and stopped[0, -1] == end


def test_bad_inputs_fail_clearly():
    model = ReformerModel(**SMALL)
    ids = random_ids((1, 10))
    ids[0, 3] = 40
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary_size=40"):
        model.predict(batch(ids), verbose=0)
    with pytest.raises(ValueError, match="exceeds"):
        model(batch(random_ids((1, 129))))
    with pytest.raises(ValueError, match="max_sequence_length"):
        model.generate(random_ids((1, 120)), 20)
    encoder = ReformerModel(**SMALL, causal=False)
    with pytest.raises(ValueError, match="causal"):
        encoder.generate(random_ids((1, 5)), 2)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"vocabulary_size": 0}, "vocabulary_size"), ({"num_layers": -1}, "num_layers"),
     ({"dropout": 1.0}, "dropout"), ({"position_embedding": "learned"}, "position_embedding"),
     ({"seed": -2}, "seed"), ({"num_buckets": 3}, "num_buckets")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ReformerModel(**{**SMALL, **kwargs})


def test_num_hashes_can_be_raised_for_evaluation():
    model = ReformerModel(**SMALL)
    ids = batch(random_ids((1, 80)))
    before = np.asarray(model(ids))
    model.set_num_hashes(6)
    after = np.asarray(model(ids))
    assert before.shape == after.shape and np.abs(before - after).max() > 1e-6
