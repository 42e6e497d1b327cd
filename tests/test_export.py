"""SavedModel export, served the way a server would: by TensorFlow alone.

The serving checks run in fresh processes that cannot import keras, keras_reformer
or tensorflow_text (see GUARD): `saved_model_cli run` (TF's own CLI, on every
signature and on bad requests), `tf.saved_model.load`, and an op census.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_hub.samplers import TopKSampler

from keras_reformer.export import export_saved_model
from keras_reformer.models import (
    ReformerBackbone,
    ReformerCausalLM,
    ReformerCausalLMPreprocessor,
)

CONFIG = dict(vocabulary_size=256, num_layers=1, hidden_dim=16, num_heads=2,
              intermediate_dim=32, bucket_size=8, max_sequence_length=128, seed=5)
CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

# A sitecustomize for the serving processes: what a model server has is
# TensorFlow, nothing of ours and no TF Text. It also leaves a mark, so a
# test can tell that the guard was active in the process it started.
GUARD = textwrap.dedent("""
    import os, sys
    for name in ("keras", "keras_reformer", "tensorflow_text"):
        sys.modules[name] = None
    with open(os.environ["GUARD_MARK"], "a") as f:
        f.write(os.path.basename(sys.argv[0]) + "\\n")
""")


@pytest.fixture(scope="module")
def guard_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(GUARD)
    return dict(os.environ, PYTHONPATH=os.fspath(folder), TF_CPP_MIN_LOG_LEVEL="2",
                GUARD_MARK=os.fspath(folder / "mark"))


def guard_marks(env):
    """Names of the programs the guard has run in so far."""
    if not os.path.exists(env["GUARD_MARK"]):
        return []
    with open(env["GUARD_MARK"]) as f:
        return f.read().split()


SERVE = textwrap.dedent("""
    import json
    import os
    import sys
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry
    args = json.loads(sys.argv[1])
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(args["path"], "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    # Every op type of every graph and function in the SavedModel, and which
    # of them a fresh `import tensorflow` does not register.
    ops = set()
    for meta in saved.meta_graphs:
        ops.update(node.op for node in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            ops.update(node.op for node in fn.node_def)
    unknown = sorted(op for op in ops if op_def_registry.get(op) is None)
    # What a server reads of each signature: its tensors' dtypes and shapes.
    def described(tensors):
        return {name: [tf.dtypes.as_dtype(t.dtype).name if t.dtype else
                       t.WhichOneof("encoding"), [d.size for d in t.tensor_shape.dim]]
                for name, t in tensors.items()}
    signatures = {name: {"inputs": described(sig.inputs),
                         "outputs": described(sig.outputs)}
                  for meta in saved.meta_graphs
                  for name, sig in meta.signature_def.items()}
    results = {"ops": sorted(ops), "unknown": unknown, "signatures": signatures,
               "tags": [sorted(meta.meta_info_def.tags) for meta in saved.meta_graphs]}
    loaded = tf.saved_model.load(args["path"], tags=["serve"])
    for name, feed in args["requests"].items():
        fn = loaded.signatures[feed.pop("signature")]
        kwargs = {k: tf.constant(v) for k, v in feed.items()}
        plain = lambda v: [x.decode() if isinstance(x, bytes) else x  # noqa: E731
                           for x in v.numpy().tolist()]  # strings as str
        try:
            out = {k: plain(v) for k, v in fn(**kwargs).items()}
            again = {k: plain(v) for k, v in fn(**kwargs).items()}
            out["deterministic"] = out == again
        except tf.errors.InvalidArgumentError as e:
            out = {"error": e.message}
        results[name] = out
    print("RESULT " + json.dumps(results))
""")


def serve(path, requests, env):
    """In one guarded fresh process (each costs seconds): the SavedModel's op
    census and signatures, then `requests` run with `tf.saved_model.load`."""
    proc = subprocess.run([sys.executable, "-c", SERVE,
                           json.dumps({"path": path, "requests": requests})],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def cli_run(path, signature, input_exprs, env, outdir):
    """`saved_model_cli run` on one signature: (process, {output: array})."""
    proc = subprocess.run(
        [CLI, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
         signature, "--input_exprs", input_exprs, "--outdir", os.fspath(outdir),
         "--overwrite"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0:
        return proc, None
    # String outputs come as object arrays (pickled): our own CLI run's files.
    return proc, {name[:-4]: np.load(os.path.join(outdir, name), allow_pickle=True)
                  for name in os.listdir(outdir) if name.endswith(".npy")}


def logits_model(**config):
    """A ReformerCausalLM's network as a plain Keras model: token ids ->
    logits. Exported, it gets the logits signatures and, over the 256 bytes,
    `next_token` (a ReformerCausalLM itself gets `generate*` instead)."""
    lm = ReformerCausalLM(ReformerBackbone(**config))
    return keras.Model(lm.input, lm.output)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = logits_model(**CONFIG)
    path = export_saved_model(model, os.fspath(root), version=3, text_signature=True)
    return model, path


def logits_requests():
    """Requests for the logits export's signatures: (requests, predict inputs
    of the valid ones), the bad ones named for what each must be refused for."""
    rng = np.random.default_rng(0)
    requests, inputs = {}, {}
    for length in (9, 70):
        ids = rng.integers(0, 256, size=(2, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, length // 2:] = 0
        requests[f"plain{length}"] = {"signature": "serving_default",
                                       "token_ids": ids.tolist()}
        requests[f"padded{length}"] = {"signature": "with_padding_mask",
                                        "token_ids": ids.tolist(),
                                        "padding_mask": mask.tolist()}
        inputs[f"plain{length}"] = (ids, np.ones_like(ids))
        inputs[f"padded{length}"] = (ids, mask)
    requests.update({
        "long": {"signature": "serving_default", "token_ids": [[1] * 129]},
        "long_text": {"signature": "next_token", "text": ["x" * 129]},
        "too_big": {"signature": "serving_default", "token_ids": [[1, 300, 3]]},
        "negative": {"signature": "serving_default", "token_ids": [[1, -1]]},
        "mask_shape": {"signature": "with_padding_mask", "token_ids": [[1, 2, 3]],
                       "padding_mask": [[1, 1]]},
        "empty_text": {"signature": "next_token", "text": ["ok", ""]},
    })
    return requests, inputs


@pytest.fixture(scope="module")
def served(exported, guard_env):
    """The logits export served once: census, signatures and every request."""
    _, path = exported
    requests, inputs = logits_requests()
    return serve(path, requests, guard_env), inputs


def test_version_folder_and_signatures(exported, served):
    _, path = exported
    assert path.endswith(os.path.join("", "3")) and os.path.exists(
        os.path.join(path, "saved_model.pb")
    )
    got, _ = served
    assert got["tags"] == [["serve"]]
    signatures = got["signatures"]
    assert {"serving_default", "with_padding_mask", "next_token"} <= set(signatures)
    # Any batch and length of int32 ids in; float logits over the 256 bytes out.
    assert signatures["serving_default"] == {
        "inputs": {"token_ids": ["int32", [-1, -1]]},
        "outputs": {"logits": ["float32", [-1, -1, 256]]},
    }
    assert signatures["with_padding_mask"]["inputs"] == {
        "token_ids": ["int32", [-1, -1]], "padding_mask": ["int32", [-1, -1]]}
    assert signatures["next_token"]["inputs"] == {"text": ["string", [-1]]}
    assert signatures["next_token"]["outputs"]["log_probs"] == ["float32", [-1, 256]]


def test_every_op_is_registered_by_plain_tensorflow(served):
    got, _ = served
    assert got["unknown"] == []
    # The census saw the real graphs: the model's ops and the text tokenizer's.
    assert {"MatMul", "DecodeRaw", "ReduceJoin", "Assert"} <= set(got["ops"])


@pytest.mark.slow  # ~35 s with its export; every signature runs in a process
# without this package in test_serve_load.py's smoke run
def test_saved_model_cli_runs_every_signature(exported, guard_env, tmp_path):
    model, path = exported
    shown = subprocess.run([CLI, "show", "--dir", path, "--all"],
                           capture_output=True, text=True, timeout=300).stdout
    assert "tag-set: 'serve'" in shown
    default = shown[shown.index("signature_def['serving_default']"):]
    default = default[: default.index("Method name")]
    assert "DT_INT32" in default and "shape: (-1, -1)" in default
    assert "shape: (-1, -1, 256)" in default
    ids = [[100, 101, 102, 32, 109], [7, 8, 9, 10, 11]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    text = "héllo wörld 日本"  # non-ASCII: 2- and 3-byte UTF-8 characters
    calls = {
        "serving_default": f"token_ids={ids}",
        "with_padding_mask": f"token_ids={ids};padding_mask={mask}",
        "next_token": f"text={[text, 'a']!r}",
    }
    got, before = {}, guard_marks(guard_env).count("saved_model_cli")
    for signature, exprs in calls.items():
        proc, got[signature] = cli_run(path, signature, exprs, guard_env,
                                       tmp_path / signature)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert guard_marks(guard_env).count("saved_model_cli") == before + 3

    def predict(rows, mask):
        return model.predict({"token_ids": np.array(rows, np.int32),
                              "padding_mask": np.array(mask, np.int32)}, verbose=0)

    np.testing.assert_allclose(got["serving_default"]["logits"],
                               predict(ids, np.ones((2, 5))), atol=1e-5)
    real = np.array(mask) > 0
    np.testing.assert_allclose(got["with_padding_mask"]["logits"][real],
                               predict(ids, mask)[real], atol=1e-5)
    # The graph's bytes are Python's: the log-probs equal the model's on
    # `s.encode("utf-8")`, whose last position depends on every byte.
    log_probs = got["next_token"]["log_probs"]
    assert log_probs.shape == (2, 256)
    for row, s in zip(log_probs, [text, "a"]):
        want_ids = [list(s.encode("utf-8"))]
        logits = predict(want_ids, np.ones_like(want_ids))[0, -1].astype(np.float64)
        want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        np.testing.assert_allclose(row, want, atol=1e-4)


# Each case is a fresh saved_model_cli process (seconds each); the messages
# of all four are also checked in one process by the test below.
@pytest.mark.parametrize("signature, exprs, message", [
    ("serving_default", "token_ids=[[1, 300, 3]]",
     "token ids must be < vocabulary_size=256"),
    pytest.param("serving_default", "token_ids=[[1, -1]]", "token ids must be >= 0",
                 marks=pytest.mark.slow),
    pytest.param("with_padding_mask", "token_ids=[[1, 2, 3]];padding_mask=[[1, 1]]",
                 "padding_mask must have the shape of token_ids", marks=pytest.mark.slow),
    pytest.param("next_token", "text=['ok', '']", "every text needs at least one byte",
                 marks=pytest.mark.slow),
])
def test_saved_model_cli_bad_request_is_invalid_argument(
        exported, guard_env, tmp_path, signature, exprs, message):
    _, path = exported
    proc, _ = cli_run(path, signature, exprs, guard_env, tmp_path)
    assert proc.returncode != 0
    assert "InvalidArgumentError" in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]


def test_loaded_signatures_equal_predict_and_reject_bad_requests(exported, served):
    model, _ = exported
    got, inputs = served
    wants = {}
    for name, (ids, mask) in inputs.items():
        wants[name] = (model.predict({"token_ids": ids, "padding_mask": mask}, verbose=0),
                       None if mask.all() else mask > 0)
    for name, (want, real) in wants.items():
        out = np.asarray(got[name]["logits"])
        assert got[name]["deterministic"]
        if real is None:
            np.testing.assert_allclose(out, want, atol=1e-5)
        else:
            np.testing.assert_allclose(out[real], want[real], atol=1e-5)
    assert "axial maximum" in got["long"]["error"]
    assert "axial maximum" in got["long_text"]["error"]
    assert "token ids must be < vocabulary_size=256" in got["too_big"]["error"]
    assert "token ids must be >= 0" in got["negative"]["error"]
    assert "padding_mask must have the shape of token_ids" in got["mask_shape"]["error"]
    assert "every text needs at least one byte" in got["empty_text"]["error"]


def test_export_arguments(exported, tmp_path):
    _, existing = exported
    model = logits_model(**CONFIG)
    root = os.path.dirname(existing)
    with pytest.raises(ValueError, match="exists"):
        export_saved_model(model, root, version=3)
    with pytest.raises(ValueError, match="`version` must be a positive integer. Received: version=0"):
        export_saved_model(model, os.fspath(tmp_path), version=0)
    small = logits_model(**{**CONFIG, "vocabulary_size": 50})
    with pytest.raises(ValueError, match="logits over bytes.*output width 50"):
        export_saved_model(small, os.fspath(tmp_path), version=2, text_signature=True)
    # A backbone's output is hidden states (2 * hidden_dim wide), not logits.
    backbone = ReformerBackbone(**CONFIG)
    with pytest.raises(ValueError, match="logits over bytes.*output width 32"):
        export_saved_model(backbone, os.fspath(tmp_path), version=2, text_signature=True)

    stale = os.path.join(tmp_path, "1")
    os.makedirs(stale)
    open(os.path.join(stale, "stale.txt"), "w").close()
    path = export_saved_model(model, os.fspath(tmp_path), overwrite=True)
    assert path == stale and not os.path.exists(os.path.join(stale, "stale.txt"))
    assert os.listdir(tmp_path) == ["1"]  # no staging folder left behind


# ------------------------------------------------------ generation (issue 13)

LM_CONFIG = dict(vocabulary_size=258, num_layers=1, hidden_dim=16, num_heads=2,
                 intermediate_dim=32, bucket_size=8, max_sequence_length=64, seed=7)


@pytest.fixture(scope="module")
def exported_lm(tmp_path_factory):
    lm = ReformerCausalLM(ReformerBackbone(**LM_CONFIG),
                          ReformerCausalLMPreprocessor(sequence_length=32))
    path = export_saved_model(lm, os.fspath(tmp_path_factory.mktemp("lm")),
                              text_signature=True, sampler=TopKSampler(k=5))
    return lm, path


def without_preprocessor(lm):
    """`lm`'s weights in a ReformerCausalLM without a preprocessor: for
    token-id prompts (with one, keras-hub's `generate` and `predict` take
    strings)."""
    twin = ReformerCausalLM(lm.backbone)
    twin.lm_head.set_weights(lm.lm_head.get_weights())
    return twin


def generate_requests():
    """(requests, prompt ids, prompt mask, texts) for the LM export."""
    ids = np.random.default_rng(1).integers(0, 256, size=(3, 19)).astype(np.int32)
    mask = (np.arange(19)[None] < np.array([[19], [6], [11]])).astype(np.int32)
    texts = ["def main(", "héllo wörld"]
    requests = {
        "ids": {"signature": "generate", "token_ids": (ids * mask).tolist(),
                "padding_mask": mask.tolist(), "max_length": 40},
        "text": {"signature": "generate_text", "text": texts, "max_length": 30},
        "sampled": {"signature": "generate_sampled", "token_ids": (ids * mask).tolist(),
                    "padding_mask": mask.tolist(), "max_length": 40, "seed": 3},
        "too_long": {"signature": "generate", "token_ids": [[1, 2]],
                     "padding_mask": [[1, 1]], "max_length": 65},
        "short": {"signature": "generate", "token_ids": [[1, 2, 3]],
                  "padding_mask": [[1, 1, 1]], "max_length": 2},
        "left_padded": {"signature": "generate", "token_ids": [[0, 2, 3]],
                        "padding_mask": [[0, 1, 1]], "max_length": 8},
        "bad_id": {"signature": "generate", "token_ids": [[1, 258]],
                   "padding_mask": [[1, 1]], "max_length": 8},
    }
    return requests, ids, mask, texts


@pytest.fixture(scope="module")
def served_lm(exported_lm, guard_env):
    """The LM export served once: census, signatures and every request."""
    _, path = exported_lm
    requests, *prompts = generate_requests()
    return serve(path, requests, guard_env), prompts


def test_loaded_generate_equals_generate(exported_lm, served_lm):
    # The references are keras-hub's generate() over the model's
    # call_with_cache, and for seeded sampling the full forward pass; the
    # export serves its own graph loop, run here by TensorFlow alone.
    lm, _ = exported_lm
    got, (ids, mask, texts) = served_lm

    # Without a preprocessor, keras-hub generates to the prompts' padded width.
    tail = [(0, 0), (0, 40 - 19)]
    prompts = {"token_ids": np.pad(ids * mask, tail), "padding_mask": np.pad(mask, tail)}
    ids_lm = without_preprocessor(lm)
    ids_lm.compile(sampler="greedy")
    # The export stops at the preprocessor's end token, as generate("auto") does.
    stop = (lm.preprocessor.end_token_id,)
    want = ids_lm.generate(prompts, stop_token_ids=stop)
    want_mask = np.asarray(want["padding_mask"]).astype(np.int32)
    got_mask = np.asarray(got["ids"]["padding_mask"])
    np.testing.assert_array_equal(got_mask, want_mask)
    # (keras-hub leaves whatever it sampled after a stop token, under mask 0.)
    np.testing.assert_array_equal(np.asarray(got["ids"]["token_ids"]) * got_mask,
                                  np.asarray(want["token_ids"]) * want_mask)
    assert got["ids"]["deterministic"]
    lm.compile(sampler="greedy")
    want_text = lm.generate(texts, max_length=30)
    assert got["text"]["text"] == want_text

    # Seeded sampling draws statelessly from the request's seed, which
    # keras-hub's generate() does not: every sampled token must be one of the
    # 5 most likely after what precedes it, by a full forward pass.
    sampled = np.asarray(got["sampled"]["token_ids"])
    sampled_mask = np.asarray(got["sampled"]["padding_mask"])
    assert got["sampled"]["deterministic"]
    np.testing.assert_array_equal((sampled * prompts["padding_mask"])[:, :19], ids * mask)
    logits = ids_lm.predict({"token_ids": sampled, "padding_mask": sampled_mask},
                            verbose=0)
    lengths = mask.sum(1)
    generated = 0
    for row in range(3):
        for position in range(lengths[row], 40):
            if not sampled_mask[row, position]:
                break
            scores = logits[row, position - 1]
            fifth = np.sort(scores)[-5]
            assert scores[sampled[row, position]] >= fifth - 1e-4, (row, position)
            generated += 1
    assert generated >= 3  # each row samples at least one token
    # ... and not merely the greedy choice.
    assert (sampled * sampled_mask != np.asarray(got["ids"]["token_ids"]) * got_mask).any()
    assert "max_length must be <= max_sequence_length=64" in got["too_long"]["error"]
    assert "a prompt is longer than max_length" in got["short"]["error"]
    assert "must be right padding" in got["left_padded"]["error"]
    assert "token ids must be < vocabulary_size=258" in got["bad_id"]["error"]


def test_generate_export_uses_registered_core_ops(served_lm):
    got, _ = served_lm
    assert got["unknown"] == []
    # The census saw the decode loop (in-place cache writes) and the text ops.
    assert {"InplaceUpdate", "DeepCopy", "DecodeRaw", "ReduceJoin"} <= set(got["ops"])


@pytest.mark.slow
def test_saved_model_cli_generates_text(exported_lm, guard_env, tmp_path):
    lm, path = exported_lm
    proc, got = cli_run(path, "generate_text", "text=['def main(', 'x'];max_length=24",
                        guard_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lm.compile(sampler="greedy")
    want = lm.generate(["def main(", "x"], max_length=24)
    assert [t.decode("utf-8") for t in got["text"]] == want


def test_generate_export_arguments(tmp_path):
    lm = ReformerCausalLM(ReformerBackbone(**LM_CONFIG))
    with pytest.raises(ValueError, match="needs its preprocessor"):
        export_saved_model(lm, os.fspath(tmp_path), text_signature=True)
    with pytest.raises(ValueError, match="sampler.*ReformerCausalLM.*ReformerBackbone"):
        export_saved_model(ReformerBackbone(**CONFIG), os.fspath(tmp_path),
                           sampler="top_k")
    # ("beam" is a keras-hub sampler now; a name keras-hub does not know.)
    with pytest.raises(ValueError, match="Unknown sampler name"):
        export_saved_model(lm, os.fspath(tmp_path), sampler="no_such_sampler")
    assert not os.path.exists(os.path.join(tmp_path, "1"))


@pytest.mark.parametrize("byte_offset", [0, 2])
def test_text_packing_in_the_graph_equals_the_preprocessor(byte_offset):
    # What the text signatures run (core ops) against the preprocessor's
    # own generate_preprocess / generate_postprocess, for both byte layouts.
    from keras_reformer.models import ReformerTokenizer
    from keras_reformer.models.reformer_causal_lm_export import _pack_text, _unpack_text

    pre = ReformerCausalLMPreprocessor(ReformerTokenizer(byte_offset=byte_offset),
                                       sequence_length=12,
                                       add_start_token=byte_offset == 0)
    lm = ReformerCausalLM(ReformerBackbone(**LM_CONFIG), pre)
    texts = ["héllo", "ab"]
    ids, mask = tf.function(lambda t: _pack_text(lm, t, 12))(tf.constant(texts))
    want = pre.generate_preprocess(texts, sequence_length=12)
    width = ids.shape[1]
    np.testing.assert_array_equal(ids, np.asarray(want["token_ids"])[:, :width])
    np.testing.assert_array_equal(mask, np.asarray(want["padding_mask"])[:, :width])
    end = pre.end_token_id
    out = {"token_ids": tf.concat([ids, tf.fill([2, 1], end)], 1),
           "padding_mask": tf.concat([mask, tf.ones([2, 1], mask.dtype)], 1)}
    got = tf.function(lambda o: _unpack_text(lm, o))(out).numpy().tolist()
    assert [g.decode() for g in got] == texts == pre.generate_postprocess(out)
