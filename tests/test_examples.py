"""Every example runs in --smoke mode; training resumes; MirroredStrategy works;
train_lm's keras-hub preset loads and generates.

Multi-worker runs of train_lm.py are in tests/test_multiworker.py."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=600, check=True):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), *args],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def load_example(script, monkeypatch):
    """An example script as a module (its `main` not run), with the examples'
    folder on `sys.path` for this test, as when the script runs."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    return importlib.import_module(script[:-3])


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


# A corpus a model can only predict well by learning its context: one
# 86-byte sentence repeated (train and validation files alike). Its bytes'
# own entropy is 4.52 bits, so a model that learned byte frequencies alone
# cannot go below that; chance (an untrained model) is ~8 bits.
SENTENCE = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"
# A short XLA run of train_lm.py on it, tiny model: ~25-35 s here.
LEARN_FLAGS = ["--jit", "on", "--seq-len", "64", "--batch-size", "8", "--epochs", "2",
               "--steps-per-epoch", "30", "--validation-steps", "2", "--num-layers", "1",
               "--hidden-dim", "32", "--intermediate-dim", "64", "--bucket-size", "32",
               "--num-heads", "4", "--num-hashes", "2", "--dropout", "0.05",
               "--clipnorm", "1.0", "--learning-rate", "2e-2", "--seed", "0",
               "--sample-len", "8"]  # every setting pinned: train_lm's defaults may change
# Measured (3 seeds): 1.44-1.46 bits per byte after the 60 steps; the same
# run with --learning-rate 0 ends at 8.37 (the untrained model). 3.0 leaves
# room for float/XLA noise and is below what context-free prediction allows.
LEARNED_BITS = 3.0


def bits_per_byte_untrained(files, flags):
    """Validation bits per byte of train_lm's model, untrained: the control."""
    import math

    import keras
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_lm
    from keras_reformer import data

    args = train_lm.parse_args(flags)
    model, _ = train_lm.build_model(args)
    _, val_files = data.split_files(files)
    val = data.lm_dataset(val_files, args.seq_len, args.batch_size, shuffle=False,
                          with_padding_mask=False).take(args.validation_steps)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = [float(loss(y, model({"token_ids": x, "padding_mask": keras.ops.ones_like(x)})))
              for x, y in val]
    return float(np.mean(losses)) / math.log(2)


@pytest.mark.slow  # ~30 s; XLA training is tested in tests/models and tests/layers
def test_train_lm_learns_with_xla(tmp_path):
    import collections
    import math

    files = []
    for name in ("train.txt", "validation.txt"):
        (tmp_path / name).write_text(SENTENCE * 60)
        files.append(os.fspath(tmp_path / name))
    counts = collections.Counter(SENTENCE).values()
    unigram_bits = -sum(c / len(SENTENCE) * math.log2(c / len(SENTENCE)) for c in counts)
    assert LEARNED_BITS < unigram_bits - 1  # passing needs context, not just counts

    run_dir = os.fspath(tmp_path / "run")
    out = run("train_lm.py", "--data", *files, "--run-dir", run_dir, *LEARN_FLAGS).stdout
    assert "XLA whole step" in out and "validation bits per byte" in out
    assert "Epoch 2/2" in out  # Keras' progress output
    result = summary(run_dir)
    assert result["steps"] == 60
    untrained = bits_per_byte_untrained(files, ["--data", *files, *LEARN_FLAGS])
    assert untrained > 7.5  # the control is at chance (log2(256) = 8 bits)
    assert result["bits_per_byte"] < LEARNED_BITS, (result, untrained)
    assert result["bits_per_byte"] < untrained - 4
    # gzip -9 on the same validation bytes: one sentence repeated compresses
    # to 0.83 bits per byte over these 1,024 bytes (gzip's header and the
    # first sentence as literals); all-zero bytes would give ~0.2, random ones 8.
    assert "gzip -9 on the same bytes" in out
    assert 0.5 < result["gzip_bits_per_byte"] < 1.2, result
    assert os.path.exists(os.path.join(run_dir, "export", "1", "saved_model.pb"))
    logs = os.path.join(run_dir, "logs", "train")
    assert any(name.startswith("events.out") for name in os.listdir(logs))
    assert "sample:" in out


@pytest.mark.slow  # two example processes (~30 s)
def test_train_lm_resumes_after_a_crash(tmp_path):
    run_dir = os.fspath(tmp_path / "run")
    # Smoke: 2 epochs x 3 steps; killed during the 2nd epoch, after step 4.
    crashed = run("train_lm.py", "--smoke", "--no-jit", "--run-dir", run_dir,
                  "--stop-after-steps", "4", check=False)
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    run("train_lm.py", "--smoke", "--no-jit", "--run-dir", run_dir)
    result = summary(run_dir)
    # Restored at the end of epoch 1 (step 3): 3 more steps, 6 in all.
    assert result["steps_this_run"] == 3
    assert result["steps"] == 6


def test_train_lm_smoke_saves_a_preset_that_generates(tmp_path, capsys, monkeypatch):
    import keras_hub

    # Importing the model classes registers them with Keras (keras-hub's
    # loader looks them up by their registered names).
    from keras_reformer.models import ReformerCausalLM

    run_dir = os.fspath(tmp_path / "run")
    out = run("train_lm.py", "--smoke", "--run-dir", run_dir).stdout
    assert "Epoch 2/2" in out and "sample:" in out
    result = summary(run_dir)
    preset = os.path.join(run_dir, "preset")
    assert result["preset"] == preset
    assert os.path.exists(os.path.join(run_dir, "export", "1", "saved_model.pb"))
    assert any(name.startswith("events.out")
               for name in os.listdir(os.path.join(run_dir, "logs", "train")))
    # keras-hub's generic loader finds our classes; the weights are the
    # trained ones, the preprocessor is the byte-level one train_lm used.
    lm = keras_hub.models.CausalLM.from_preset(preset)
    assert isinstance(lm, ReformerCausalLM)
    trained = np.load(os.path.join(run_dir, "final_weights.npz"))
    weights = lm.get_weights()
    assert len(weights) == len(trained.files)
    for i, weight in enumerate(weights):
        np.testing.assert_array_equal(weight, trained[f"arr_{i}"])
    assert lm.preprocessor.sequence_length == 256  # --smoke's --seq-len
    assert not lm.preprocessor.add_start_token
    lm.compile(sampler="greedy")
    want = lm.generate("import ", max_length=20)
    assert isinstance(want, str) and want.startswith("import ")
    # The example loads it the same way. Run here, not in a process of its
    # own: this process has TensorFlow loaded already (its own process is
    # test_generate_from_preset_smoke, -m slow).
    example = load_example("generate_from_preset.py", monkeypatch)
    text = example.main(["--preset", preset, "--prompt", "import ", "--max-length", "20",
                         "--sampler", "greedy"])
    out = capsys.readouterr().out
    assert "loaded ReformerCausalLM" in out
    assert f"generated (greedy):\n{want}" in out and text == want


@pytest.mark.slow  # ~13 s; test_train_lm_smoke_saves_a_preset_that_generates runs its main()
def test_generate_from_preset_smoke():
    out = run("generate_from_preset.py", "--smoke").stdout
    assert "saved a tiny untrained preset" in out
    assert "loaded ReformerCausalLM" in out
    assert "generated (top_k):\ndef main(" in out


@pytest.mark.slow  # ~30 s; Mirrored fit is compared with one device in tests/test_distribute.py
def test_train_lm_mirrored_on_two_logical_cpus(tmp_path):
    run_dir = os.fspath(tmp_path / "run")
    out = run("train_lm.py", "--smoke", "--jit", "on", "--strategy", "mirrored",
              "--cpu-replicas", "2", "--run-dir", run_dir).stdout
    result = summary(run_dir)
    assert result["replicas"] == 2 and result["copies_per_weight"] == 2
    assert result["replicas_identical"] is True
    # XLA stays on under MirroredStrategy, compiled per replica.
    assert "XLA per replica" in out and result["xla"] == "per replica"


@pytest.mark.slow  # ~25 s; LSHAttention in users' own models: tests/test_drop_in.py
def test_mix_into_keras_smoke(tmp_path):
    out = run("mix_into_keras.py", "--smoke", "--out", os.fspath(tmp_path)).stdout
    for name in ("multi_head_attention", "lsh_attention", "reversible"):
        assert f"{name}: validation accuracy" in out
        assert os.path.exists(tmp_path / f"{name}.keras")
    assert out.count("reloaded predictions identical: True") == 3


@pytest.mark.slow  # ~30 s; the export and its serving are tested in tests/test_export.py
def test_export_and_serve_smoke(tmp_path):
    out = run("export_and_serve.py", "--smoke", "--export-dir", os.fspath(tmp_path)).stdout
    # A byte-level ReformerCausalLM: 256 bytes, start and end tokens.
    assert "fresh process without keras: logits [1, 5, 258], generate_text" in out
    # The generated text continues the prompt; the smoke model is barely
    # trained, so its bytes may include a quote, and Python then quotes the
    # string with the other kind.
    assert re.search(r"""generate_text \[['"]def main\(""", out), out
    assert "serving_default" in out and "tensorflow_model_server" in out
    assert "saved_model_cli run" in out and "--signature_def generate_text" in out


@pytest.mark.slow  # ~20 s; the duplication examples run under -m slow (their doc tables are checked against the CSVs)
def test_duplication_task_smoke(tmp_path):
    out = run("duplication_task.py", "--smoke", "--logdir", os.fspath(tmp_path),
              "--csv", os.fspath(tmp_path / "table.csv")).stdout
    with open(tmp_path / "table.csv") as f:  # the printed table, one row per cell
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["eval"]) for r in rows] == [
        ("LSH-1", "LSH-1"), ("LSH-1", "LSH-2"),
        ("full attention (MultiHeadAttention)", "no hashing")]
    for row in rows:
        assert f" {row['accuracy']} |" in out
    assert "| train \\ eval | LSH-1 | LSH-2 |" in out
    assert "| LSH-1 |" in out
    assert "| full attention (MultiHeadAttention) |" in out  # the reference row
    for kind in ("LSH-1", "full"):  # accuracy curves in TensorBoard, per model
        assert any(n.startswith("events.out") for n in os.listdir(tmp_path / kind))


EXAMPLES = ["train_lm.py", "mix_into_keras.py", "export_and_serve.py",
            "duplication_task.py", "duplication_reach.py", "generate_from_preset.py",
            "import_transformers.py"]
# Every example's `main(["--help"])` in one process: TensorFlow loads once,
# not once per example. Each help is printed between two markers.
HELP = """
import contextlib, importlib, io, sys
sys.path.insert(0, sys.argv[1])
for script in sys.argv[2:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            importlib.import_module(script[:-3]).main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0, (script, stop.code)
    print(f"<<{script}>>" + out.getvalue() + "<<end>>")
"""


def test_help():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", HELP, os.path.join(ROOT, "examples"),
                          *EXAMPLES], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    for script in EXAMPLES:
        help_text = out.stdout.split(f"<<{script}>>")[1].split("<<end>>")[0]
        assert "usage:" in help_text and "--smoke" in help_text, script


@pytest.mark.slow  # ~40 s; the import, generation and presets are tests/convert's
def test_import_transformers_smoke_saves_a_preset_that_loads(tmp_path):
    preset = os.fspath(tmp_path / "preset")
    out = run("import_transformers.py", "--smoke", "--preset", preset).stdout
    assert "local, local, lsh" in out and "generated (greedy): 'The Reformer " in out
    import keras_hub

    from keras_reformer.models import ReformerCausalLM  # noqa: F401  (registers)
    lm = keras_hub.models.CausalLM.from_preset(preset)
    assert lm.backbone.reference_rules and lm.backbone.attention_types[2] == "lsh"
    assert lm.preprocessor.tokenizer.byte_offset == 2
    # The preset holds the imported weights and the fixed rotations.
    fresh = ReformerCausalLM.from_transformers(
        os.path.join(ROOT, "tests", "fixtures", "hf_reformer_enwik8"))
    ids = np.arange(1, 41, dtype="int32")[None]
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(lm(x), fresh(x), atol=1e-5)


@pytest.mark.slow  # ~20 s; its figures in the docs are checked against their CSV
def test_duplication_reach_smoke(tmp_path):
    out = run("duplication_reach.py", "--smoke", "--csv", os.fspath(tmp_path / "r.csv")).stdout
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["eval"] for r in rows] == ["LSH-1", "LSH-2"]
    for row in rows:  # the printed figures, and the classes cover every query
        assert f"eval {row['eval']}: accuracy {row['accuracy']};" in out
        shares = [float(row[c].split("%")[0]) for c in
                  ("split by the hash", "same bucket, crowded out", "in reach")]
        assert abs(sum(shares) - 100) < 0.2
    assert rows[0]["reach_64"] and not rows[1]["reach_64"]
    assert "## trained LSH-1 (" in out
    for rounds in (1, 2):  # --smoke's --eval-rounds
        assert f"eval LSH-{rounds}: accuracy" in out
    # The three classes of every second-copy query, and the reach sweep.
    assert "split by the hash:" in out and "crowded out:" in out and "in reach:" in out
    for chunks_before in (1, 2, 4):
        assert f"eval LSH-1, num_chunks_before={chunks_before} " in out


def test_duplication_reach_classes_by_hand():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from duplication_reach import classify

    # Length 8: queries 4, 5, 6 need keys 1, 2, 3 (one round, one head).
    buckets = np.array([0, 1, 2, 3, 1, 5, 6, 7])[None, None, None]
    assert classify(buckets, 8, reach=4).tolist() == [[2, 0, 0]]
    # Key 1 and query 4 share bucket 9 with 2 and 3 in between: 3 slots back.
    crowded = np.array([0, 9, 9, 9, 9, 5, 6, 7])[None, None, None]
    assert classify(crowded, 8, reach=2).tolist() == [[1, 0, 0]]
    assert classify(crowded, 8, reach=3).tolist() == [[2, 0, 0]]
    # A second round (or head) where query 5 meets key 2: in reach somewhere.
    rounds = np.array([[0, 9, 9, 9, 9, 5, 6, 7], [0, 1, 4, 3, 2, 4, 6, 7]])
    assert classify(rounds[None, None], 8, reach=2).tolist() == [[1, 2, 0]]


@pytest.mark.slow  # two example processes, ~70 s; the classes are tested above
def test_duplication_reach_on_saved_weights(tmp_path):
    run("duplication_task.py", "--smoke", "--logdir", os.fspath(tmp_path / "tb"),
        "--weights-dir", os.fspath(tmp_path / "w"))
    out = run("duplication_reach.py", "--weights-dir", os.fspath(tmp_path / "w"),
              "--train-rounds", "1", "--eval-rounds", "1", "2", "--length", "64",
              "--hidden-dim", "32", "--eval-samples", "8").stdout
    assert "eval LSH-2: accuracy" in out and "in reach:" in out
    assert "num_chunks_before=4" in out
