"""ReformerCausalLM: cached decoding against full passes, keras-hub's generate()
and samplers, text in and out, saving."""

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models import (
    ReformerBackbone,
    ReformerCausalLM,
    ReformerCausalLMPreprocessor,
)

TINY = dict(vocabulary_size=40, num_layers=2, hidden_dim=32, num_heads=2,
            intermediate_dim=64, feedforward_chunk_size=8, bucket_size=8,
            max_sequence_length=128, seed=3)
LENGTH = 70  # 9 chunks of 8


def ids_of(shape, seed=0, vocab=40):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def full_logits(lm, ids):
    """The reference: one full pass over the whole rows (no padding), called
    directly (a `predict` of a model compiled with XLA would compile anew for
    every length)."""
    return np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                         training=False))


def make_lm(**kwargs):
    return ReformerCausalLM(ReformerBackbone(**{**TINY, **kwargs}))


@pytest.fixture(scope="module")
def lm():
    # Some initializers draw from Keras' global seed: fixed here, so that the
    # weights do not depend on the tests that ran before in this process.
    keras.utils.set_random_seed(0)
    return make_lm(num_hashes=2)


def cached_errors(lm, ids, lengths):
    """Max |cached - full| logits over every position after each row's prompt.

    Row b's prompt is its first lengths[b] tokens, right-padded to the
    longest; then each row feeds its own next tokens one at a time.
    """
    full = full_logits(lm, ids)
    decoder = lm._decoder()
    # One traced step for the whole loop: eagerly, each token would run the
    # layers op by op.
    step = tf.function(decoder.step)
    prompt = max(lengths)
    mask = np.arange(prompt)[None] < np.asarray(lengths)[:, None]
    logits, _, caches = decoder.prompt_pass(
        tf.constant(np.where(mask, ids[:, :prompt], 0)), tf.constant(mask), LENGTH
    )
    rows = np.arange(len(ids))
    errors = [np.abs(logits.numpy()[b] - full[b, lengths[b] - 1]).max() for b in rows]
    position = np.array(lengths)
    while position.min() < LENGTH:
        at = np.minimum(position, LENGTH - 1)
        logits, _, caches = step(
            tf.constant(ids[rows, at]), tf.constant(at, tf.int32), caches
        )
        errors += [np.abs(logits.numpy()[b] - full[b, position[b]]).max()
                   for b in rows if position[b] < LENGTH]
        position = position + 1
    return max(errors), len(errors)


@pytest.mark.parametrize(
    "rounds, lengths, extra",
    [
        (1, [21, 21], {}),
        (2, [21, 9], {}),
        (4, [17, 5], {}),
        # 2 buckets over 70 tokens: every bucket outgrows its cached window.
        (2, [12, 3], {"num_buckets": 2}),
        # The default layout stacks the blocks' weights (each block reads its
        # slices of the stack's variables); here each block keeps its own.
        (2, [21, 9], {"stack_weights": False}),
        # A short convolution: its window reaches back into the prompt, and
        # before position 0 in a 2-token prompt.
        (2, [21, 2], {"short_convolution": 4, "position_embedding": "sinusoidal"}),
        (1, [1, 9], {"short_convolution": 1}),
        # Shifted values: the new token's value goes to the key before it.
        (2, [21, 9], {"value_shift": True}),
        (2, [12, 1], {"value_shift": True, "num_buckets": 2, "short_convolution": 3}),
        # A reach of two chunks: twice the cached keys per bucket.
        (2, [12, 3], {"num_buckets": 2, "num_chunks_before": 2}),
        # Local attention layers: a ring buffer of one window per layer.
        (2, [21, 9], {"attention_types": ["local", "lsh"], "local_chunk_length": 8}),
        (1, [12, 1], {"attention_types": ["local", "local"], "local_chunk_length": 5,
                      "local_num_chunks_before": 2, "short_convolution": 3}),
    ],
)
def test_cached_logits_equal_full_pass(rounds, lengths, extra):
    lm = make_lm(num_hashes=rounds, **extra)
    ids = ids_of((2, LENGTH), seed=rounds)
    error, count = cached_errors(lm, ids, lengths)
    assert count == 2 * LENGTH - sum(lengths) + 2
    assert error < 1e-4


def greedy_reference(lm, prompts, max_length):
    """Step-by-step argmax of predict over the growing row."""
    rows = []
    for prompt in prompts:
        row = list(prompt)
        while len(row) < max_length:
            logits = full_logits(lm, np.array([row], np.int32))
            row.append(int(logits[0, -1].argmax()))
        rows.append(row)
    return np.array(rows)


def padded(ids, lengths, width):
    mask = (np.arange(width)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = np.pad(ids, [[0, 0], [0, width - ids.shape[1]]])[:, :width]
    return {"token_ids": ids * mask, "padding_mask": mask}


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("extra", [{}, {"short_convolution": 3, "value_shift": True,
                                        "position_embedding": "sinusoidal"}])
def test_keras_hub_generate_equals_stepwise_argmax(jit_compile, extra):
    lm = make_lm(num_hashes=2, **extra)
    lm.compile(sampler="greedy", jit_compile=jit_compile)
    ids = ids_of((2, 12), seed=8)
    lengths = [12, 3]  # the loop starts at the shorter prompt
    out = lm.generate(padded(ids, lengths, 26), stop_token_ids=None)
    expected = greedy_reference(lm, [ids[b, :n] for b, n in enumerate(lengths)], 26)
    np.testing.assert_array_equal(out["token_ids"], expected)
    assert out["padding_mask"].all()


def test_stop_token_ends_each_row_alone(lm):
    lm.compile(sampler="greedy")
    ids = padded(ids_of((2, 10), seed=2), [10, 6], 36)
    free = lm.generate(ids, stop_token_ids=None)
    # Row 0's 4th generated token, or its next one that is not the padding
    # id 0: as a stop id, 0 is ambiguous (positions not generated yet hold
    # 0 too, and keras-hub's sampler looks for stop ids there).
    stop = next(int(t) for t in free["token_ids"][0, 13:] if t != 0)
    out = lm.generate(ids, stop_token_ids=(stop,))
    for b, length in enumerate([10, 6]):
        generated = free["token_ids"][b, length:]
        hits = np.flatnonzero(generated == stop)
        end = length + (hits[0] + 1 if hits.size else generated.size)
        np.testing.assert_array_equal(out["token_ids"][b, :end], free["token_ids"][b, :end])
        assert out["padding_mask"][b, :end].all() and not out["padding_mask"][b, end:].any()
    stripped = lm.generate(ids, stop_token_ids=(stop,), strip_prompt=True)
    n = int(out["padding_mask"][0].sum()) - 10
    np.testing.assert_array_equal(stripped["token_ids"][0, :n], out["token_ids"][0, 10:10 + n])


@pytest.mark.parametrize("name", ["top_k", "top_p", "random", "greedy", "beam"])
def test_keras_hub_samplers_by_name(lm, name):
    lm.compile(sampler=name)
    out = lm.generate(padded(ids_of((2, 5), seed=4), [5, 5], 20), stop_token_ids=None)
    assert out["token_ids"].shape == (2, 20)
    assert (out["token_ids"] >= 0).all() and (out["token_ids"] < 40).all()


def test_seeded_samplers_are_reproducible_and_top_1_is_greedy(lm):
    ids = padded(ids_of((2, 6), seed=5), [6, 4], 30)

    def run(sampler):
        lm.compile(sampler=sampler)
        return lm.generate(ids, stop_token_ids=None)["token_ids"]

    first = run(keras_hub.samplers.TopKSampler(k=5, seed=11))
    again = run(keras_hub.samplers.TopKSampler(k=5, seed=11))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, run(keras_hub.samplers.TopKSampler(k=5, seed=12)))
    np.testing.assert_array_equal(
        run(keras_hub.samplers.TopKSampler(k=1, seed=3)), run("greedy")
    )


def test_bad_prompts_are_clear_errors(lm):
    with pytest.raises(ValueError, match="right padding"):
        lm.generate({"token_ids": ids_of((1, 4)), "padding_mask": [[0, 1, 1, 1]]},
                    stop_token_ids=None)
    with pytest.raises(ValueError, match=r"vocabulary_size=40.*token_ids\[0, 2\] = 45"):
        lm.generate({"token_ids": np.array([[1, 2, 45]]),
                     "padding_mask": np.ones((1, 3), np.int32)}, stop_token_ids=None)
    # The same dtype error as TokenIdCheck's.
    with pytest.raises(TypeError, match=r"integer token ids.*token_ids.dtype=float32"):
        lm.generate({"token_ids": np.array([[1.0, 2.0]], np.float32),
                     "padding_mask": np.ones((1, 2), np.int32)}, stop_token_ids=None)
    with pytest.raises(ValueError, match="at least one real token"):
        lm.generate({"token_ids": np.zeros((1, 4), np.int32),
                     "padding_mask": np.zeros((1, 4), np.int32)}, stop_token_ids=None)
    with pytest.raises(ValueError, match="max_sequence_length"):
        lm.generate({"token_ids": ids_of((1, 130)),
                     "padding_mask": np.ones((1, 130), np.int32)}, stop_token_ids=None)
    with pytest.raises(ValueError, match="preprocessor"):
        lm.generate("hello")  # strings without a preprocessor
    with pytest.raises(ValueError, match="`backbone` must be .*Received: backbone=<Model name="):
        ReformerCausalLM(keras.Model())


# ----------------------------------------------------------------- text


def text_lm(sequence_length=32, **kwargs):
    backbone = ReformerBackbone(**{**TINY, "vocabulary_size": 258, "num_layers": 1,
                                   **kwargs})
    return ReformerCausalLM(backbone,
                            ReformerCausalLMPreprocessor(sequence_length=sequence_length))


def test_fit_on_strings_and_generate_text():
    lm = text_lm()
    texts = ["def main():\n    return 0\n", "def add(a, b):\n    return a + b\n"] * 4
    history = lm.fit(tf.data.Dataset.from_tensor_slices(texts).batch(4), epochs=2,
                     verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    lm.fit(texts, batch_size=8, epochs=1, verbose=0)  # strings without tf.data
    lm.compile(sampler="greedy")
    out = lm.generate("def main(", max_length=48)
    assert isinstance(out, str) and out.startswith("def main(")
    both = lm.generate(["def main(", "x"], max_length=48)
    assert both[0] == out and both[1].startswith("x")
    only_new = lm.generate("def main(", max_length=48, strip_prompt=True)
    assert out == "def main(" + only_new
    with pytest.raises(ValueError, match=r"`max_length` must be an integer in \[1, 128\]"
                                         r".*Received: max_length=129"):
        lm.generate("x", max_length=129)


def test_keras_file_round_trip(tmp_path):
    lm = text_lm(24)
    lm.compile(sampler=keras_hub.samplers.TopPSampler(p=0.5, seed=4))
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ReformerCausalLM)
    assert loaded.preprocessor.get_config() == lm.preprocessor.get_config()
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    assert loaded.sampler.get_config() == lm.sampler.get_config()
    np.testing.assert_allclose(lm.predict(["abc def"], verbose=0),
                               loaded.predict(["abc def"], verbose=0), atol=1e-6)


@pytest.mark.parametrize("stack_weights", [
    # ~15 s; presets of per-block layouts are also saved and loaded by the
    # imported models' tests (tests/convert, mixed local/LSH layers).
    pytest.param(False, marks=pytest.mark.slow),
    True,
])
def test_preset_round_trip_and_keras_hub_finds_the_class(tmp_path, stack_weights):
    lm = text_lm(24, stack_weights=stack_weights)
    lm.fit(["hello world, hello keras"] * 4, batch_size=4, epochs=1, verbose=0)
    preset = str(tmp_path / "preset")
    lm.save_to_preset(preset)
    want = lm.predict(["hello"], verbose=0)
    for loader in (ReformerCausalLM, keras_hub.models.CausalLM):
        loaded = loader.from_preset(preset)
        assert type(loaded) is ReformerCausalLM
        assert loaded.backbone.get_config() == lm.backbone.get_config()
        np.testing.assert_allclose(loaded.predict(["hello"], verbose=0), want, atol=1e-6)
    backbone = keras_hub.models.Backbone.from_preset(preset)
    assert type(backbone) is ReformerBackbone
    pre = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    assert type(pre) is ReformerCausalLMPreprocessor
    assert pre.get_config() == lm.preprocessor.get_config()
