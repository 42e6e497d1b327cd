"""Checkpoint import against the reference implementation's own numbers.

tests/fixtures/hf_reformer_<layout>/ hold small HF transformers Reformers in
the two public checkpoints' layouts (random weights) and what HF computed
with them in eval mode: written by benchmarks/peers/reformer_fixtures.py (the
PyTorch venv); no test needs torch.
"""

import json
import os
import shutil

import numpy as np
import pytest

from keras_reformer.models import ReformerCausalLM

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
LAYOUTS = ["enwik8", "crime_and_punishment"]


def fixture(layout):
    folder = os.path.join(FIXTURES, f"hf_reformer_{layout}")
    return folder, dict(np.load(os.path.join(folder, "golden.npz")))


def streams(lm, ids, mask):
    """The FFN stream before each layer and after the last (what HF records
    as hidden states), by running the imported blocks one after another."""
    backbone = lm.backbone
    valid = mask.astype(bool)
    x = backbone.embed(ids, valid)
    x1 = x2 = x
    out = [np.asarray(x2)]
    for f, g in backbone.reversible_stack.blocks:
        x1 = x1 + f(x2, mask=valid)
        x2 = x2 + g(x1)
        out.append(np.asarray(x2))
    return np.stack(out, 1)


def relative_error(got, want, rows=None):
    if rows is not None:
        got, want = got[rows], want[rows]
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.fixture(scope="module", params=LAYOUTS)
def imported(request):
    folder, golden = fixture(request.param)
    lm = ReformerCausalLM.from_transformers(folder, rotations=golden["rotations"],
                                            preprocessor=None)
    return request.param, lm, golden


def test_full_batch_equals_the_reference(imported):
    layout, lm, golden = imported
    ids = golden["token_ids"].astype("int32")
    mask = np.ones_like(ids)
    logits = np.asarray(lm({"token_ids": ids, "padding_mask": mask}))
    assert relative_error(logits, golden["logits"]) < 1e-4, layout
    hidden = streams(lm, ids, mask)
    assert relative_error(hidden, golden["hidden_states"]) < 1e-4, layout


def test_padded_batch_equals_the_reference_on_real_tokens(imported):
    layout, lm, golden = imported
    mask = golden["padding_mask"].astype("int32")
    ids = golden["token_ids"].astype("int32") * mask
    logits = np.asarray(lm({"token_ids": ids, "padding_mask": mask}))
    real = mask.astype(bool)
    assert relative_error(logits, golden["padded_logits"], real) < 1e-4, layout
    hidden = streams(lm, ids, mask)
    assert relative_error(hidden.transpose(0, 2, 1, 3),
                          golden["padded_hidden_states"].transpose(0, 2, 1, 3),
                          real) < 1e-4, layout


def test_other_rotations_change_the_outputs():
    # The fixture's rotations matter: the check above can fail.
    folder, golden = fixture("enwik8")
    lm = ReformerCausalLM.from_transformers(folder)
    ids = golden["token_ids"].astype("int32")
    logits = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    assert relative_error(logits, golden["logits"]) > 1e-3


def edited(tmp_path, layout, **changes):
    folder, _ = fixture(layout)
    target = tmp_path / layout
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@pytest.mark.parametrize("field,value", [
    ("is_decoder", False),
    ("hidden_act", "tanh"),
    ("axial_pos_embds", False),
    ("lsh_num_chunks_after", 1),
    ("attn_layers", ["local", "dense", "local", "lsh", "local", "lsh"]),
])
def test_refuses_configs_it_cannot_reproduce(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        ReformerCausalLM.from_transformers(edited(tmp_path, "crime_and_punishment",
                                                  **{field: value}))


def test_missing_and_extra_tensors_are_named(tmp_path):
    # Two layers more in the config than in the file: the first missing
    # tensor is named.
    kinds = ["local", "lsh"] * 4
    with pytest.raises(ValueError, match="layers.6"):
        ReformerCausalLM.from_transformers(edited(tmp_path, "crime_and_punishment",
                                                  attn_layers=kinds,
                                                  num_hidden_layers=8))


def test_generate_runs_full_passes_over_the_prefix():
    # With the reference's rules outputs are not prefix-stable: greedy
    # generation must equal the argmax of a full pass over each prefix.
    import keras_hub

    folder, golden = fixture("crime_and_punishment")
    lm = ReformerCausalLM.from_transformers(folder, rotations=golden["rotations"],
                                            preprocessor=None)
    lm.compile(sampler="greedy")
    prompt = golden["token_ids"][:1, :13].astype("int32")
    width = 20
    ids = np.pad(prompt, [[0, 0], [0, width - 13]])
    mask = (np.arange(width) < 13)[None].astype("int32")
    x = {"token_ids": ids, "padding_mask": mask}
    out = lm.generate(x, stop_token_ids=None)
    row = list(prompt[0])
    while len(row) < width:
        x_row = np.array([row], "int32")
        logits = np.asarray(lm({"token_ids": x_row, "padding_mask": np.ones_like(x_row)}))
        row.append(int(logits[0, -1].argmax()))
    np.testing.assert_array_equal(out["token_ids"][0], row)
    # Only the contrastive sampler reads the prompt's hidden states (the
    # others skip that pass); with alpha=0 it is greedy.
    lm.compile(sampler=keras_hub.samplers.ContrastiveSampler(k=3, alpha=0.0))
    np.testing.assert_array_equal(lm.generate(x, stop_token_ids=None)["token_ids"][0], row)


def fine_tuned(jit_compile):
    """The crime-and-punishment layout fine-tuned on text, through the
    checkpoint's SentencePiece tokenizer and keras-hub's `fit`."""
    import keras

    folder, golden = fixture("crime_and_punishment")
    lm = ReformerCausalLM.from_transformers(folder, rotations=golden["rotations"])
    lm.preprocessor.sequence_length = 16
    texts = ["A few months later, Raskolnikov walked out."] * 4
    lm.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=jit_compile)
    # One batch per epoch and no dropout in this checkpoint: epoch k's loss
    # is the loss of the weights after k - 1 updates.
    losses = lm.fit(texts, batch_size=4, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.1
    x, _, _ = lm.preprocessor(texts[:2])
    return lm, {k: np.asarray(v).astype("int32") for k, v in x.items()}


def test_fine_tunes_and_saves_as_a_preset(tmp_path):
    import keras_hub

    lm, x = fine_tuned(jit_compile=False)
    lm.save_to_preset(tmp_path / "preset")
    loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "preset"))
    assert loaded.backbone.reference_rules
    assert type(loaded.preprocessor.tokenizer) is type(lm.preprocessor.tokenizer)
    np.testing.assert_allclose(loaded(x), lm(x), atol=1e-5)


@pytest.mark.slow  # ~60 s; test_fine_tunes_and_saves_as_a_preset trains in graph mode
def test_fine_tunes_with_xla_saves_and_exports(tmp_path):
    import keras
    import tensorflow as tf

    from keras_reformer.export import export_saved_model

    lm, x = fine_tuned(jit_compile=True)
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    np.testing.assert_allclose(loaded(x), lm(x), atol=1e-5)
    assert loaded.preprocessor.tokenizer.vocabulary_size() == 320
    path = export_saved_model(lm, tmp_path / "export")
    served = tf.saved_model.load(path).signatures["with_padding_mask"]
    got = served(token_ids=tf.constant(x["token_ids"]),
                 padding_mask=tf.constant(x["padding_mask"]))["logits"]
    np.testing.assert_allclose(got, lm(x), atol=1e-4)
    with pytest.raises(ValueError, match="logits signatures only"):
        export_saved_model(lm, tmp_path / "export", version=2, sampler="greedy")
