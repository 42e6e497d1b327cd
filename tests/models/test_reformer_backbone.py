"""ReformerBackbone and its LM head against a hand-wired reference, causality,
padding, saving, configs."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models import ReformerBackbone, ReformerCausalLM, ReformerModel
from tests.layers.test_short_convolution import reference as window_reference

SMALL = dict(vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
             intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
             num_hashes=2, max_sequence_length=128, seed=3)


def language_model(**kwargs):
    """The backbone with its head: logits out."""
    return ReformerCausalLM(ReformerBackbone(**kwargs))


def batch(ids):
    ids = np.asarray(ids, np.int32)
    return {"token_ids": ids, "padding_mask": (ids != 0).astype(np.int32)}


def random_ids(shape, seed=0, vocab=40):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def layer_norm(x, layer):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layer.epsilon) * np.asarray(layer.gamma) + np.asarray(
        layer.beta
    )


def dense(x, layer):
    return x @ np.asarray(layer.kernel) + np.asarray(layer.bias)


def gelu(x):
    return 0.5 * x * (1 + np.asarray(tf.math.erf(x / np.sqrt(2.0))))


def positions(model, length, width):
    if model.position_embedding_type == "axial":
        layer = model.position_embedding
        l2 = layer.axial_shape[1]
        first, second = np.asarray(layer.first), np.asarray(layer.second)
        return np.stack([np.concatenate([first[p // l2], second[p % l2]])
                         for p in range(length)])
    if model.position_embedding_type == "sinusoidal":
        table = np.zeros((length, width))
        for p in range(length):
            for i in range(0, width, 2):
                angle = p / 10000 ** (i / width)
                table[p, i], table[p, i + 1] = np.sin(angle), np.cos(angle)
        return table
    return 0.0


def short_convolution(model, x):
    """The model's ShortConvolution by the layer tests' explicit windows."""
    layer = model.short_convolution
    return window_reference(x, np.asarray(layer.kernel), np.asarray(layer.bias),
                            model.causal, np.ones(x.shape[:2]))


def hand_wired(lm, inputs):
    """The model's math written out by hand from its sublayers' weights.

    Only LSH attention is called as a layer (it has its own brute-force
    reference tests); embeddings, norms, the FFN, the reversible residuals
    and the head are NumPy.
    """
    model = lm.backbone
    ids = inputs["token_ids"]
    mask = tf.constant(inputs["padding_mask"] > 0)
    table = np.asarray(model.token_embedding.embeddings)
    x = table[ids] + positions(model, ids.shape[1], table.shape[1])
    if model.short_convolution is not None:
        x = x + short_convolution(model, x * inputs["padding_mask"][..., None])
    y1 = y2 = x
    for f, g in model.reversible_stack.blocks:
        attention_in = tf.constant(layer_norm(y2, f.norm), tf.float32)
        y1 = y1 + np.asarray(f.attention(attention_in, query_mask=mask,
                                         use_causal_mask=model.causal, training=False))
        ffn = g.feed_forward
        h = gelu(dense(layer_norm(y1, g.norm), ffn.intermediate_dense))
        y2 = y2 + dense(h, ffn.output_dense)
    h = layer_norm(np.concatenate([y1, y2], -1), model.final_norm)
    return dense(h, lm.lm_head)


@pytest.mark.parametrize("causal,position,width", [
    (True, "axial", None), (False, "sinusoidal", None), (True, None, None),
    (True, "axial", 3), (False, "sinusoidal", 4), (False, None, 1),
])
def test_matches_hand_wired_reference(causal, position, width):
    if causal:
        model = language_model(**SMALL, position_embedding=position,
                               short_convolution=width, dropout=0.1, attention_dropout=0.1)
    else:  # an encoder with a head of its own
        backbone = ReformerBackbone(**SMALL, causal=False, position_embedding=position,
                                    short_convolution=width, dropout=0.1,
                                    attention_dropout=0.1)
        head = keras.layers.Dense(40, name="lm_head")
        model = keras.Model(backbone.input, head(backbone.output))
        model.backbone, model.lm_head = backbone, head
    ids = random_ids((2, 45))
    ids[1, 30:] = 0  # padding
    inputs = batch(ids)
    got = np.asarray(model(inputs, training=False))
    want = hand_wired(model, inputs)
    real = inputs["padding_mask"] > 0
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)


@pytest.mark.parametrize("width", [None, 4])
def test_causal_logits_never_depend_on_later_tokens(width):
    model = language_model(**SMALL, short_convolution=width)
    ids = random_ids((1, 100))
    base = np.asarray(model(batch(ids)))
    rng = np.random.default_rng(1)
    for t in rng.integers(0, 99, size=5):
        changed = ids.copy()
        changed[:, t + 1:] = random_ids((1, 99 - t), seed=int(t) + 10)
        out = np.asarray(model(batch(changed)))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


@pytest.mark.parametrize("width", [None, 3])
def test_variable_lengths_and_padding_in_one_model(width):
    model = language_model(**{**SMALL, "num_buckets": 4}, short_convolution=width)
    long = random_ids((2, 60))
    short = long[:, :37]
    padded = np.concatenate([short, np.zeros((2, 23), np.int32)], axis=1)
    a = np.asarray(model.predict(batch(short), verbose=0))
    b = np.asarray(model.predict(batch(padded), verbose=0))
    np.testing.assert_allclose(b[:, :37], a, atol=1e-5)
    assert np.asarray(model.predict(batch(long), verbose=0)).shape == (2, 60, 40)


def test_fit_with_jit_lowers_loss():
    keras.utils.set_random_seed(0)
    model = language_model(**{**SMALL, "num_layers": 1})  # one layer: faster XLA compile
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
    encoder = ReformerBackbone(**SMALL, causal=False)
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
    model = ReformerBackbone(**SMALL, axial_shape=(8, 16), causal=False, reversible=False,
                             short_convolution=2, num_chunks_before=2)
    assert ReformerModel is ReformerBackbone
    config = model.get_config()
    assert config["short_convolution"] == 2
    assert config["num_chunks_before"] == 2
    # It reaches every attention layer (not only the config).
    attention = model.reversible_stack.blocks[0][0].attention
    assert attention.num_chunks_before == 2
    clone = ReformerBackbone.from_config(config)
    assert clone.get_config() == config
    for key in ("vocabulary_size", "num_layers", "hidden_dim", "num_heads", "key_dim",
                "intermediate_dim", "feedforward_chunk_size", "bucket_size",
                "num_hashes", "num_buckets", "dropout", "attention_dropout",
                "max_sequence_length", "axial_shape", "causal", "reversible", "seed",
                "stack_weights"):
        assert key in config


def test_stacked_weights_are_the_default_and_old_configs_keep_theirs():
    model = ReformerBackbone(**SMALL)
    assert model.stack_weights is True and model.reversible_stack.stacked
    config = model.get_config()
    assert config["stack_weights"] is True
    assert ReformerBackbone.from_config(config).reversible_stack.stacked
    # A config saved when per-block weights were the default has no key.
    del config["stack_weights"]
    old = ReformerBackbone.from_config(config)
    assert old.stack_weights is False and not old.reversible_stack.stacked
    assert old.get_config()["stack_weights"] is False


def test_keras_file_round_trip_in_fresh_process(tmp_path):
    model = language_model(**SMALL, dropout=0.1)
    ids = random_ids((2, 50))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    want = np.asarray(model.predict(batch(ids), verbose=0))
    np.save(os.path.join(tmp_path, "ids.npy"), ids)
    code = textwrap.dedent(f"""
        import numpy as np, keras
        import keras_reformer.models  # registers the model classes
        model = keras.saving.load_model({path!r}, safe_mode=True)
        ids = np.load({os.path.join(tmp_path, 'ids.npy')!r})
        out = model.predict({{"token_ids": ids, "padding_mask": np.ones_like(ids)}}, verbose=0)
        np.save({os.path.join(tmp_path, 'out.npy')!r}, out)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    np.testing.assert_array_equal(np.load(os.path.join(tmp_path, "out.npy")), want)


def test_bad_inputs_fail_clearly():
    model = ReformerBackbone(**SMALL)
    ids = random_ids((1, 10))
    ids[0, 3] = 40
    # Arrays are checked before the (possibly XLA) step: a ValueError.
    with pytest.raises(ValueError, match=r"vocabulary_size=40.*token_ids\[0, 3\] = 40"):
        model.predict(batch(ids), verbose=0)
    with pytest.raises(ValueError, match="exceeds"):
        model(batch(random_ids((1, 129))))
    encoder = ReformerBackbone(**SMALL, causal=False)
    with pytest.raises(ValueError, match="causal"):
        ReformerCausalLM(encoder)


@pytest.mark.parametrize("position", ["axial", "sinusoidal"])
def test_too_long_inputs_fail_at_run_time_with_dynamic_shapes(position):
    model = ReformerBackbone(**SMALL, position_embedding=position)
    spec = tf.TensorSpec([None, None], tf.int32)
    fn = tf.function(lambda ids, mask: model({"token_ids": ids, "padding_mask": mask}),
                     input_signature=[spec, spec])
    ok = random_ids((1, 128))
    assert fn(ok, np.ones_like(ok)).shape == (1, 128, 2 * SMALL["hidden_dim"])
    long = random_ids((1, 129))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_sequence_length=128"):
        fn(long, np.ones_like(long))


@pytest.mark.parametrize(
    "kwargs,name",
    [({"vocabulary_size": 0}, "vocabulary_size"), ({"num_layers": -1}, "num_layers"),
     ({"dropout": 1.0}, "dropout"), ({"position_embedding": "learned"}, "position_embedding"),
     ({"seed": -2}, "seed"), ({"num_buckets": 3}, "num_buckets"),
     ({"bucket_size": 0}, "bucket_size"), ({"num_hashes": 0}, "num_hashes"),
     ({"axial_shape": (4, 4)}, "axial_shape"), ({"causal": "yes"}, "causal"),
     ({"attention_dropout": -0.1}, "attention_dropout"),
     ({"feedforward_chunk_size": 0}, "feedforward_chunk_size"),
     ({"short_convolution": 0}, "short_convolution"),
     ({"short_convolution": 2.5}, "short_convolution"),
     ({"num_chunks_before": -1}, "num_chunks_before"),
     ({"num_chunks_before": 1.5}, "num_chunks_before")],
)
def test_bad_arguments(kwargs, name):
    # The message names the argument and shows the value received.
    value = re.escape(repr(kwargs[name]))
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: .*{name}={value}"):
        ReformerBackbone(**{**SMALL, **kwargs})


def test_num_hashes_can_be_raised_for_evaluation():
    model = ReformerBackbone(**SMALL)
    ids = batch(random_ids((1, 80)))
    before = np.asarray(model(ids))
    model.set_num_hashes(6)
    after = np.asarray(model(ids))
    assert before.shape == after.shape and np.abs(before - after).max() > 1e-6


def test_reversible_gradients_equal_plain_autodiff_with_dropout():
    # Training mode: dropout masks and fresh LSH rotations must be replayed
    # exactly when the reversible stack recomputes its blocks.
    config = dict(SMALL, dropout=0.2, attention_dropout=0.2)
    reversible = language_model(**config, reversible=True)
    plain = language_model(**config, reversible=False)
    plain.set_weights(reversible.get_weights())
    ids = random_ids((2, 40))
    ids[1, 33:] = 0
    inputs = {k: tf.constant(v) for k, v in batch(ids).items()}
    labels = tf.constant(np.roll(ids, -1, axis=1))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_grads(model):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(inputs, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss_a, grads_a = loss_and_grads(reversible)
    loss_b, grads_b = loss_and_grads(plain)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    assert len(grads_a) == len(grads_b)
    for var, a, b in zip(reversible.trainable_variables, grads_a, grads_b):
        assert a is not None and b is not None, var.path
        a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)  # IndexedSlices
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5, err_msg=var.path)
    # Dropout was really on: an inference call gives another loss.
    assert abs(float(loss_fn(labels, reversible(inputs))) - float(loss_a)) > 1e-4


def test_set_num_hashes_reaches_predict_and_config():
    model = ReformerBackbone(**SMALL)
    inputs = batch(random_ids((1, 80)))
    before = model.predict(inputs, verbose=0)
    model.set_num_hashes(6)
    after = model.predict(inputs, verbose=0)
    np.testing.assert_allclose(after, np.asarray(model(inputs)), atol=1e-5)
    assert np.abs(before - after).max() > 1e-6
    assert model.get_config()["num_hashes"] == 6
    clone = ReformerBackbone.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(np.asarray(clone(inputs)), after, atol=1e-5)


def test_dtype_policy_is_in_the_config():
    model = language_model(**SMALL, dtype="mixed_bfloat16")
    clone = ReformerCausalLM.from_config(model.get_config())
    for m in (model, clone):
        assert m.backbone.reversible_stack.dtype_policy.name == "mixed_bfloat16"
        assert m.lm_head.compute_dtype == "bfloat16"
    out = clone(batch(random_ids((1, 20))))
    assert out.shape == (1, 20, 40)


def test_global_seed_gives_the_same_weights_and_seed_the_same_outputs():
    # The documented contract: initial weights follow Keras' global seed,
    # `seed` the computation's randomness (hash rotations).
    def build(global_seed, seed):
        keras.utils.set_random_seed(global_seed)
        return ReformerBackbone(**{**SMALL, "seed": seed})

    a, b, c = build(5, 3), build(5, 3), build(6, 3)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc)
               for wa, wc in zip(a.get_weights(), c.get_weights()))
    # Same trainable weights, another hashing seed (a non-trainable state,
    # saved with the weights): other buckets, other outputs.
    d = build(5, 4)
    for target, source in zip(d.trainable_variables, a.trainable_variables):
        target.assign(source)
    x = batch(random_ids((1, 64)))
    out_a = np.asarray(a(x, training=False))
    np.testing.assert_allclose(np.asarray(b(x, training=False)), out_a, atol=1e-6)
    assert np.abs(np.asarray(d(x, training=False)) - out_a).max() > 1e-4
