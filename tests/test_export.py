"""SavedModel export: served in a fresh process that cannot import keras."""

import ast
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_reformer.export import export_saved_model
from keras_reformer.models import ReformerModel

CONFIG = dict(vocabulary_size=256, num_layers=1, hidden_dim=16, num_heads=2,
              intermediate_dim=32, bucket_size=8, max_sequence_length=128, seed=5)

# Runs in a fresh interpreter where `import keras` (and so keras_reformer)
# fails: what TF Serving has is TensorFlow (+ TF Text), nothing of ours.
SERVE = textwrap.dedent("""
    import sys
    sys.modules["keras"] = None
    sys.modules["keras_reformer"] = None
    import json
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry
    args = json.loads(sys.argv[1])
    ops = args.get("ops", [])
    not_core = sorted(op for op in ops if op_def_registry.get(op) is None)
    if args.get("text"):
        # Register the TF Text ops the way TF Serving has them: the op
        # libraries only (importing the tensorflow_text package imports keras).
        import glob, importlib.util, os
        root = os.path.dirname(importlib.util.find_spec("tensorflow_text").origin)
        for lib in sorted(glob.glob(os.path.join(root, "**", "_*.so"), recursive=True)):
            tf.load_op_library(lib)
    unknown = sorted(op for op in ops if op_def_registry.get(op) is None)
    loaded = tf.saved_model.load(args["path"])
    results = {"ops": {"not_core": not_core, "unknown": unknown}}
    for name, feed in args["requests"].items():
        fn = loaded.signatures[feed.pop("signature")]
        kwargs = {k: tf.constant(v) for k, v in feed.items()}
        try:
            out = {k: v.numpy().tolist() for k, v in fn(**kwargs).items()}
            again = {k: v.numpy().tolist() for k, v in fn(**kwargs).items()}
            out["deterministic"] = out == again
        except tf.errors.InvalidArgumentError as e:
            out = {"error": e.message}
        results[name] = out
    print("RESULT " + json.dumps(results))
""")


def serve(path, requests, text=False, ops=()):
    """Runs `requests` in a fresh process without keras; with `ops`, also
    reports which of those ops core TF lacks, and which TF Text lacks too."""
    import json

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", SERVE,
         json.dumps({"path": path, "requests": requests, "text": text,
                     "ops": list(ops)})],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = ReformerModel(**CONFIG)
    path = export_saved_model(model, os.fspath(root), version=3, text_signature=True)
    return model, path


def test_version_folder_and_signatures(exported):
    _, path = exported
    assert path.endswith(os.path.join("", "3")) and os.path.exists(
        os.path.join(path, "saved_model.pb")
    )
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", path, "--all"],
                           capture_output=True, text=True, timeout=300).stdout
    assert "signature_def['serving_default']" in shown
    assert "token_ids" in shown and "logits" in shown
    assert "signature_def['with_padding_mask']" in shown
    assert "signature_def['next_token']" in shown
    assert "tag-set: 'serve'" in shown
    default = shown[shown.index("signature_def['serving_default']"):]
    default = default[: default.index("Method name")]
    assert "DT_INT32" in default and "shape: (-1, -1)" in default
    assert "shape: (-1, -1, 256)" in default

    # Only core TF and TF Text ops: what the stock model server links.
    line = next(x for x in shown.splitlines() if "contains the following ops" in x)
    ops = ast.literal_eval(line[line.index("{"):])
    got = serve(path, {}, text=True, ops=sorted(ops))["ops"]
    assert got["unknown"] == []
    assert got["not_core"] and all(op.startswith("TFText>") for op in got["not_core"])


def test_served_logits_equal_predict_for_two_lengths(exported):
    model, path = exported
    rng = np.random.default_rng(0)
    requests, wants = {}, {}
    for length in (9, 70):
        ids = rng.integers(0, 256, size=(2, length)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, length // 2:] = 0
        requests[f"plain{length}"] = {"signature": "serving_default",
                                       "token_ids": ids.tolist()}
        requests[f"padded{length}"] = {"signature": "with_padding_mask",
                                        "token_ids": ids.tolist(),
                                        "padding_mask": mask.tolist()}
        wants[f"plain{length}"] = (model.predict(
            {"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0), None)
        wants[f"padded{length}"] = (model.predict(
            {"token_ids": ids, "padding_mask": mask}, verbose=0), mask > 0)
    got = serve(path, requests, text=True)
    for name, (want, real) in wants.items():
        out = np.asarray(got[name]["logits"])
        assert got[name]["deterministic"]
        if real is None:
            np.testing.assert_allclose(out, want, atol=1e-5)
        else:
            np.testing.assert_allclose(out[real], want[real], atol=1e-5)


def test_text_signature_gives_next_byte_log_probs(exported):
    model, path = exported
    texts = ["héllo wörld", "a"]
    got = serve(path, {"t": {"signature": "next_token", "text": texts}}, text=True)
    log_probs = np.asarray(got["t"]["log_probs"])
    for row, text in zip(log_probs, texts):
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)[None]
        logits = model.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)},
                               verbose=0)[0, -1].astype(np.float64)
        want = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        np.testing.assert_allclose(row, want, atol=1e-4)


def test_bad_requests_are_invalid_argument(exported):
    _, path = exported
    got = serve(path, {
        "vocab": {"signature": "serving_default", "token_ids": [[1, 256, 3]]},
        "negative": {"signature": "serving_default", "token_ids": [[1, -1]]},
        "long": {"signature": "serving_default", "token_ids": [[1] * 129]},
        "mask": {"signature": "with_padding_mask", "token_ids": [[1, 2, 3]],
                 "padding_mask": [[1, 1]]},
    }, text=True)
    assert "vocabulary_size=256" in got["vocab"]["error"]
    assert ">= 0" in got["negative"]["error"]
    assert "axial maximum" in got["long"]["error"]
    assert "padding_mask" in got["mask"]["error"]


def test_export_arguments_and_token_signature_without_tf_text(exported, tmp_path):
    _, existing = exported
    model = ReformerModel(**CONFIG)
    root = os.path.dirname(existing)
    with pytest.raises(ValueError, match="exists"):
        export_saved_model(model, root, version=3)
    with pytest.raises(ValueError, match="version"):
        export_saved_model(model, os.fspath(tmp_path), version=0)
    small = ReformerModel(**{**CONFIG, "vocabulary_size": 50})
    with pytest.raises(ValueError, match="byte-level"):
        export_saved_model(small, os.fspath(tmp_path), version=2, text_signature=True)
    encoder = ReformerModel(**CONFIG, causal=False)
    with pytest.raises(ValueError, match="causal"):
        export_saved_model(encoder, os.fspath(tmp_path), version=2, text_signature=True)

    stale = os.path.join(tmp_path, "1")
    os.makedirs(stale)
    open(os.path.join(stale, "stale.txt"), "w").close()
    path = export_saved_model(model, os.fspath(tmp_path), overwrite=True)
    assert path == stale and not os.path.exists(os.path.join(stale, "stale.txt"))
    assert os.listdir(tmp_path) == ["1"]  # no staging folder left behind
    # Without the text signature, no TF Text ops are needed to load it.
    ids = [[5, 6, 7, 8]]
    got = serve(path, {"r": {"signature": "serving_default", "token_ids": ids}})
    want = model.predict({"token_ids": np.array(ids), "padding_mask": np.ones((1, 4))},
                         verbose=0)
    np.testing.assert_allclose(np.asarray(got["r"]["logits"]), want, atol=1e-5)


def test_byte_tokenizer_round_trip():
    import tensorflow as tf

    from keras_reformer import text

    texts = ["héllo", "", "日本"]
    ids = text.tokenize(tf.constant(texts))
    assert ids.dtype == tf.int32
    assert ids.to_list() == [list(t.encode("utf-8")) for t in texts]
    assert [t.decode("utf-8") for t in text.detokenize(ids).numpy()] == texts
    # Cut inside a character: replaced, not an error.
    assert text.detokenize(ids[2][:4]).numpy().decode("utf-8") == "日\ufffd"
    with pytest.raises(tf.errors.InvalidArgumentError, match="< 256"):
        text.detokenize(tf.constant([[65, 300]]))
