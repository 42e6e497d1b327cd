"""ReformerCausalLM: cached decoding against full passes, generate(), text, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import samplers
from keras_reformer.models import (
    ReformerCausalLM,
    ReformerCausalLMPreprocessor,
    ReformerModel,
)

TINY = dict(vocabulary_size=40, num_layers=2, hidden_dim=32, num_heads=2,
            intermediate_dim=64, feedforward_chunk_size=8, bucket_size=8,
            max_sequence_length=128, seed=3)
LENGTH = 70  # 9 chunks of 8


def ids_of(shape, seed=0, vocab=40):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


def full_logits(lm, ids):
    """The reference: one full pass over the whole rows (no padding)."""
    return lm.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0)


@pytest.fixture(scope="module")
def lm():
    return ReformerCausalLM(ReformerModel(num_hashes=2, **TINY))


def cached_errors(lm, ids, lengths):
    """Max |cached - full| logits over every position after each row's prompt.

    Row b's prompt is its first lengths[b] tokens, right-padded to the
    longest; then each row feeds its own next tokens one at a time.
    """
    full = full_logits(lm, ids)
    decoder = lm._decoder()
    prompt = max(lengths)
    mask = np.arange(prompt)[None] < np.asarray(lengths)[:, None]
    logits, caches = decoder.prompt_pass(
        tf.constant(np.where(mask, ids[:, :prompt], 0)), tf.constant(mask), LENGTH
    )
    rows = np.arange(len(ids))
    errors = [np.abs(logits.numpy()[b] - full[b, lengths[b] - 1]).max() for b in rows]
    table = decoder.position_table(LENGTH)
    position = np.array(lengths)
    while position.min() < LENGTH:
        at = np.minimum(position, LENGTH - 1)
        logits, caches = decoder.step(
            tf.constant(ids[rows, at]), tf.constant(at, tf.int32), caches, table
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
        (4, [17, 17], {}),
        # 2 buckets over 70 tokens: every bucket outgrows its cached window.
        (2, [12, 3], {"num_buckets": 2}),
        # A headless backbone: the task's own vocabulary projection.
        (2, [21, 9], {"include_head": False}),
        # A short convolution: its window reaches back into the prompt, and
        # before position 0 in a 2-token prompt.
        (2, [21, 2], {"short_convolution": 4}),
        (1, [1, 9], {"short_convolution": 1}),
        # Shifted values: the new token's value goes to the key before it.
        (2, [21, 9], {"value_shift": True}),
        (2, [12, 1], {"value_shift": True, "num_buckets": 2, "short_convolution": 3}),
        # A reach of two chunks: twice the cached keys per bucket.
        (2, [12, 3], {"num_buckets": 2, "num_chunks_before": 2}),
    ],
)
def test_cached_logits_equal_full_pass(rounds, lengths, extra):
    lm = ReformerCausalLM(ReformerModel(num_hashes=rounds, **{**TINY, **extra}))
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


@pytest.mark.parametrize("jit_compile", [False, True])
def test_greedy_generate_equals_stepwise_argmax(lm, jit_compile):
    ids = ids_of((3, 19), seed=5)
    lengths = [19, 6, 11]
    mask = (np.arange(19)[None] < np.array(lengths)[:, None]).astype(np.int32)
    out = lm.generate({"token_ids": ids * mask, "padding_mask": mask},
                      max_length=40, sampler="greedy", jit_compile=jit_compile)
    expected = greedy_reference(lm, [ids[b, :n] for b, n in enumerate(lengths)], 40)
    np.testing.assert_array_equal(out["token_ids"], expected)
    assert out["padding_mask"].all()


def test_stop_token_ends_each_row_alone(lm):
    ids = ids_of((2, 10), seed=6)
    free = lm.generate(ids, max_length=36, sampler="greedy", jit_compile=False)
    stop = int(free["token_ids"][0, 13])  # row 0's 4th generated token
    out = lm.generate(ids, max_length=36, sampler="greedy", stop_token_ids=(stop,),
                      jit_compile=False)
    for b in range(2):
        generated = free["token_ids"][b, 10:]
        hits = np.flatnonzero(generated == stop)
        end = 36 if hits.size == 0 else 10 + hits[0] + 1
        np.testing.assert_array_equal(out["token_ids"][b, :end], free["token_ids"][b, :end])
        assert out["padding_mask"][b, :end].all() and not out["padding_mask"][b, end:].any()
        assert (out["token_ids"][b, end:] == 0).all()
    assert not out["padding_mask"][0].all()  # row 0 did stop


@pytest.mark.parametrize(
    "sampler",
    [samplers.RandomSampler(temperature=0.8, seed=11),
     samplers.TopKSampler(k=5, seed=11),
     samplers.TopPSampler(p=0.9, seed=11)],
    ids=["random", "top_k", "top_p"],
)
def test_seeded_sampling_is_reproducible(lm, sampler):
    ids = ids_of((2, 8), seed=7)
    first = lm.generate(ids, max_length=40, sampler=sampler, jit_compile=False)
    again = lm.generate(ids, max_length=40, sampler=sampler, jit_compile=False)
    np.testing.assert_array_equal(first["token_ids"], again["token_ids"])
    other = sampler.__class__.from_config({**sampler.get_config(), "seed": 12})
    changed = lm.generate(ids, max_length=40, sampler=other, jit_compile=False)
    assert (changed["token_ids"] != first["token_ids"]).any()
    # Only the allowed tokens are ever drawn: top-k=1 is greedy.
    if isinstance(sampler, samplers.TopKSampler):
        greedy = lm.generate(ids, max_length=40, sampler="greedy", jit_compile=False)
        top1 = lm.generate(ids, max_length=40, jit_compile=False,
                           sampler=samplers.TopKSampler(k=1, seed=3))
        np.testing.assert_array_equal(top1["token_ids"], greedy["token_ids"])


def test_samplers_restrict_the_draw():
    # 1000 rows of the same distribution: top-k and top-p never leave their set.
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = tf.math.log(tf.constant(np.tile(probs, (1000, 1))))
    seed = tf.constant([1, 2])
    assert set(samplers.TopKSampler(k=2)(logits, seed).numpy()) == {0, 1}
    # p=0.6: 0.5 alone is short of it, so token 1 joins; 2 and 3 never.
    assert set(samplers.TopPSampler(p=0.6)(logits, seed).numpy()) == {0, 1}
    assert set(samplers.TopPSampler(p=0.4)(logits, seed).numpy()) == {0}
    assert set(samplers.GreedySampler()(logits, seed).numpy()) == {0}
    for name in ("greedy", "random", "top_k", "top_p"):
        sampler = samplers.get(name)
        assert samplers.get(samplers.serialize(sampler)).get_config() == sampler.get_config()


def test_bad_arguments_are_clear_errors(lm):
    with pytest.raises(ValueError, match=r"max_length.*max_sequence_length=128.*200"):
        lm.generate(ids_of((1, 4)), max_length=200)
    for p in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"`p` must be a number in \(0, 1\]"):
            samplers.TopPSampler(p=p)
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        samplers.TopKSampler(k=0)
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        samplers.RandomSampler(temperature=0)
    with pytest.raises(ValueError, match="Unknown sampler name"):
        samplers.get("beam")
    with pytest.raises(ValueError, match="causal backbone.*causal=False"):
        ReformerCausalLM(ReformerModel(**{**TINY, "causal": False}))
    with pytest.raises(ValueError, match="no preprocessor"):
        lm.generate("hello", max_length=20)
    with pytest.raises(ValueError, match="right padding"):
        lm.generate({"token_ids": ids_of((1, 4)), "padding_mask": [[0, 1, 1, 1]]},
                    max_length=20)
    with pytest.raises(ValueError, match=r"vocabulary_size=40"):
        lm.generate(np.array([[1, 2, 45]]), max_length=20)
    with pytest.raises(ValueError, match="vocabulary_size must be at least 258"):
        ReformerCausalLM(lm.backbone, ReformerCausalLMPreprocessor(16))


# ----------------------------------------------------------------- text


def test_preprocessor_packs_bytes_and_shifts_labels():
    pre = ReformerCausalLMPreprocessor(sequence_length=6)
    x, y, w = pre(["ab", "héllo"])
    expected = np.array([[256, 97, 98, 257, 0, 0, 0],
                         [256] + list("héllo".encode()[:5]) + [257]])
    np.testing.assert_array_equal(x["token_ids"], expected[:, :-1])
    np.testing.assert_array_equal(y, expected[:, 1:])
    np.testing.assert_array_equal(x["padding_mask"], [[1, 1, 1, 1, 0, 0], [1] * 6])
    np.testing.assert_array_equal(w, [[1, 1, 1, 0, 0, 0], [1] * 6])
    prompt = pre.generate_preprocess(["def main("], sequence_length=12)
    assert prompt["padding_mask"].numpy().sum() == 10  # start + 9 bytes, no end
    assert pre.generate_postprocess(prompt).numpy()[0] == b"def main("


def test_preprocessor_graph_uses_core_tf_ops_only():
    pre = ReformerCausalLMPreprocessor(sequence_length=16)
    graph = tf.function(pre).get_concrete_function(
        tf.TensorSpec([None], tf.string)).graph
    post = tf.function(pre.generate_postprocess).get_concrete_function(
        {"token_ids": tf.TensorSpec([None, 16], tf.int32),
         "padding_mask": tf.TensorSpec([None, 16], tf.int32)}).graph
    types = {op.type for g in (graph, post) for op in g.get_operations()}
    # Ops of extension libraries (tensorflow_text) are not in tf.raw_ops.
    assert all(hasattr(tf.raw_ops, t) for t in types), sorted(
        t for t in types if not hasattr(tf.raw_ops, t))


def test_fit_on_strings_and_generate_text():
    backbone = ReformerModel(**{**TINY, "vocabulary_size": 258, "num_layers": 1})
    lm = ReformerCausalLM(backbone, ReformerCausalLMPreprocessor(sequence_length=32))
    texts = ["def main():\n    return 0\n", "def add(a, b):\n    return a + b\n"] * 4
    history = lm.fit(tf.data.Dataset.from_tensor_slices(texts).batch(4), epochs=2,
                     verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    lm.fit(texts, batch_size=8, epochs=1, verbose=0)  # strings without tf.data
    lm.compile(sampler="greedy")
    out = lm.generate("def main(", max_length=48, jit_compile=False)
    assert isinstance(out, str) and out.startswith("def main(")
    both = lm.generate(["def main(", "x"], max_length=48, jit_compile=False)
    assert both[0] == out and both[1].startswith("x")
    only_new = lm.generate("def main(", max_length=48, strip_prompt=True,
                           jit_compile=False)
    assert out == "def main(" + only_new


def test_keras_file_round_trip(tmp_path):
    backbone = ReformerModel(**{**TINY, "vocabulary_size": 258, "num_layers": 1})
    lm = ReformerCausalLM(backbone, ReformerCausalLMPreprocessor(sequence_length=24))
    lm.compile(sampler=samplers.TopPSampler(p=0.5, seed=4))
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ReformerCausalLM)
    assert loaded.preprocessor.get_config() == lm.preprocessor.get_config()
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    assert loaded.sampler.get_config() == lm.sampler.get_config()
    np.testing.assert_allclose(lm.predict(["abc def"], verbose=0),
                               loaded.predict(["abc def"], verbose=0), atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("value_shift", [False, True])
def test_generate_with_short_convolution_equals_stepwise_argmax(jit_compile, value_shift):
    lm = ReformerCausalLM(ReformerModel(num_hashes=2, short_convolution=3,
                                        value_shift=value_shift, **TINY))
    ids = ids_of((2, 12), seed=8)
    lengths = [12, 1]
    mask = (np.arange(12)[None] < np.array(lengths)[:, None]).astype(np.int32)
    out = lm.generate({"token_ids": ids * mask, "padding_mask": mask},
                      max_length=22, sampler="greedy", jit_compile=jit_compile)
    expected = greedy_reference(lm, [ids[b, :n] for b, n in enumerate(lengths)], 22)
    np.testing.assert_array_equal(out["token_ids"], expected)
