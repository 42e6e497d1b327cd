"""The imported checkpoints' tokenizers against the reference's.

golden_tokens.json in each fixture holds what the reference makes of a few
texts (benchmarks/peers/reformer_fixtures.py): for enwik8 the model card's
rule (UTF-8 bytes + 2), for crime-and-punishment HF transformers'
`ReformerTokenizer` over the fixture's `spiece.model` (a small BPE model;
HF reads it with the `tokenizers` library, the library here with TF Text's
op in graphs and the `sentencepiece` package eagerly).
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.export import export_saved_model
from keras_reformer.models import (
    ReformerBackbone,
    ReformerCausalLM,
    ReformerCausalLMPreprocessor,
    ReformerSentencePieceTokenizer,
    ReformerTokenizer,
)
from tests.convert.test_transformers_reformer import LAYOUTS, fixture
from tests.test_export import guard_env, guard_marks, serve  # noqa: F401  (guard_env: a fixture)

TOKENIZERS = {"enwik8": ReformerTokenizer,
              "crime_and_punishment": ReformerSentencePieceTokenizer}


def golden_tokens(layout):
    folder, _ = fixture(layout)
    with open(os.path.join(folder, "golden_tokens.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module", params=LAYOUTS)
def imported(request):
    folder, golden = fixture(request.param)
    lm = ReformerCausalLM.from_transformers(folder, rotations=golden["rotations"])
    return request.param, lm


def test_the_checkpoint_tokenizer_comes_with_the_import(imported):
    layout, lm = imported
    tokenizer = lm.preprocessor.tokenizer
    assert type(tokenizer) is TOKENIZERS[layout]
    assert tokenizer.vocabulary_size() == lm.backbone.vocabulary_size
    # As the reference's: no start token, "</s>" ends a sequence (id 1 in
    # both: tensor2tensor's byte layout, and the fixture's SentencePiece).
    assert tokenizer.start_token_id is None and not lm.preprocessor.add_start_token
    assert tokenizer.end_token_id == 1 and tokenizer.pad_token_id == 0


def test_ids_equal_the_reference_eager_and_in_tf_data(imported):
    layout, lm = imported
    golden = golden_tokens(layout)
    tokenizer = lm.preprocessor.tokenizer
    eager = [np.asarray(tokenizer(text)).tolist() for text in golden["texts"]]
    assert eager == golden["token_ids"]
    batched = tf.data.Dataset.from_tensor_slices(golden["texts"]).batch(4).map(tokenizer)
    assert next(iter(batched)).to_list() == golden["token_ids"]
    unbatched = tf.data.Dataset.from_tensor_slices(golden["texts"]).map(tokenizer)
    assert [t.numpy().tolist() for t in unbatched] == golden["token_ids"]


def test_detokenize_equals_the_reference(imported):
    layout, lm = imported
    golden = golden_tokens(layout)
    tokenizer = lm.preprocessor.tokenizer
    for ids, want in zip(golden["token_ids"], golden["decoded"]):
        if "<unk>" in want:
            # SentencePiece writes an unknown piece as " \u2047 ", HF as "<unk>".
            unk = tokenizer.token_to_id("<unk>")
            assert unk in ids
            continue
        assert tokenizer.detokenize(ids) == want
        traced = tf.function(tokenizer.detokenize)(tf.constant([ids], tf.int32))
        assert traced[0].numpy().decode() == want


def test_preprocessor_packs_without_a_start_token(imported):
    layout, lm = imported
    golden = golden_tokens(layout)
    ids = golden["token_ids"][0]
    n = len(ids)
    prompt = lm.preprocessor.generate_preprocess([golden["texts"][0]], sequence_length=n + 3)
    np.testing.assert_array_equal(prompt["token_ids"][0], ids + [0, 0, 0])
    x, y, w = lm.preprocessor([golden["texts"][0]], sequence_length=n + 3)
    # Training rows: the ids, the end token, padding; labels one ahead.
    full = ids + [1, 0, 0, 0]
    np.testing.assert_array_equal(x["token_ids"][0], full[: n + 3])
    np.testing.assert_array_equal(y[0], full[1: n + 4])
    np.testing.assert_array_equal(w[0], np.arange(1, n + 4) <= n)


def test_generates_text_and_saves_the_tokenizer_in_the_preset(imported, tmp_path):
    import keras_hub

    layout, lm = imported
    golden = golden_tokens(layout)
    text = golden["texts"][0][:12]  # no unknown pieces
    prompt_ids = np.asarray(lm.preprocessor.tokenizer(text)).tolist()
    lm.compile(sampler="greedy")
    out = lm.generate(text, max_length=len(prompt_ids) + 5, stop_token_ids=None)
    assert out.startswith(text) and len(out) > len(text)
    # The same tokens as generating from the reference's ids.
    twin = ReformerCausalLM(lm.backbone)
    twin.lm_head.set_weights(lm.lm_head.get_weights())
    twin.compile(sampler="greedy")
    width = len(prompt_ids) + 5
    ids = np.array([prompt_ids + [0] * 5], "int32")
    mask = (np.arange(width) < len(prompt_ids))[None].astype("int32")
    want = twin.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    assert out == lm.preprocessor.tokenizer.detokenize(want["token_ids"][0].tolist())

    lm.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "preset"))
    tokenizer = loaded.preprocessor.tokenizer
    assert type(tokenizer) is TOKENIZERS[layout]
    assert [np.asarray(tokenizer(t)).tolist() for t in golden["texts"]] == golden["token_ids"]
    assert not loaded.preprocessor.add_start_token


def test_sentence_piece_models_export_id_signatures_that_stock_tf_loads(
        guard_env, tmp_path):
    # The library's own rules (so generate signatures exist) with the
    # fixture's SentencePiece tokenizer: the export must not carry TF Text's
    # op, and takes ids.
    folder, _ = fixture("crime_and_punishment")
    tokenizer = ReformerSentencePieceTokenizer(os.path.join(folder, "spiece.model"))
    backbone = ReformerBackbone(vocabulary_size=320, num_layers=1, hidden_dim=16,
                                num_heads=2, intermediate_dim=32, bucket_size=8,
                                max_sequence_length=64, seed=7)
    lm = ReformerCausalLM(backbone, ReformerCausalLMPreprocessor(
        tokenizer, sequence_length=32, add_start_token=False))
    with pytest.raises(ValueError, match="ReformerSentencePieceTokenizer.*id signatures"):
        export_saved_model(lm, tmp_path / "export", text_signature=True)
    path = export_saved_model(lm, tmp_path / "export")
    ids = np.array([[5, 6, 7, 0, 0, 0]], "int32")
    mask = np.array([[1, 1, 1, 0, 0, 0]], "int32")
    got = serve(path, {"g": {"signature": "generate", "token_ids": ids.tolist(),
                             "padding_mask": mask.tolist(), "max_length": 6}}, guard_env)
    assert guard_marks(guard_env)  # served by a process without TF Text
    twin = ReformerCausalLM(backbone)
    twin.lm_head.set_weights(lm.lm_head.get_weights())
    twin.compile(sampler="greedy")
    want = twin.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=[1])
    assert got["g"]["token_ids"] == want["token_ids"].tolist()


def test_a_sentence_piece_file_of_the_wrong_size_is_refused(tmp_path):
    import shutil

    enwik8, _ = fixture("enwik8")
    crime, _ = fixture("crime_and_punishment")
    target = tmp_path / "ckpt"
    shutil.copytree(enwik8, target)
    shutil.copy(os.path.join(crime, "spiece.model"), target / "spiece.model")
    with pytest.raises(ValueError, match="320 pieces.*vocab_size=258"):
        ReformerCausalLM.from_transformers(str(target))
    with pytest.raises(ValueError, match="preprocessor"):
        ReformerCausalLM.from_transformers(enwik8, preprocessor="bytes")
