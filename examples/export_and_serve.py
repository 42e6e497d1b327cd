"""Export a ReformerCausalLM for TF Serving, inspect it, and serve it with
TensorFlow alone: `saved_model_cli run`, and a fresh process that has neither
Keras, keras_reformer nor TF Text.

The model is a byte-level `ReformerCausalLM` (a keras-hub `CausalLM` on a
`ReformerBackbone`, with a `ReformerCausalLMPreprocessor`), so the
SavedModel has the logits signatures (`serving_default`,
`with_padding_mask`) and the generation ones (`generate` on token ids,
`generate_text` on strings: greedy cached decoding in the graph).

    python examples/export_and_serve.py                    # a small model
    python examples/export_and_serve.py --model runs/train_lm/preset --export-dir models/reformer
    python examples/export_and_serve.py --model runs/m.keras
    python examples/export_and_serve.py --smoke

It prints the `tensorflow_model_server` / docker command and a `curl` REST
request for the exported folder (see docs/serving.md).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a model server has: TensorFlow's core ops, nothing of ours, no TF Text.
SERVE = textwrap.dedent("""
    import sys
    for name in ("keras", "keras_reformer", "tensorflow_text"):
        sys.modules[name] = None
    import json
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    ids = tf.constant([[100, 101, 102, 32, 109]], tf.int32)
    logits = loaded.signatures["serving_default"](token_ids=ids)["logits"]
    texts = tf.constant(["def main(", "import "])
    out = loaded.signatures["generate_text"](text=texts, max_length=tf.constant(16))
    print(json.dumps({"logits_shape": logits.shape.as_list(),
                      "texts": [t.decode("utf-8", "replace")
                                for t in out["text"].numpy()]}))
""")


def load_or_build(model_path=None, smoke=False):
    """The model to export: `model_path` (a preset folder or a .keras file)
    or, without one, the example's small byte-level ReformerCausalLM."""
    import keras
    import keras_hub

    import keras_reformer as kr
    # Importing the model classes registers them, for loading a preset or a
    # .keras file (`import keras_reformer` alone does not import them).
    from keras_reformer.models import ReformerCausalLM

    if model_path and os.path.isdir(model_path):
        model = keras_hub.models.CausalLM.from_preset(model_path)
    elif model_path:
        model = keras.saving.load_model(model_path)
    else:
        size = 32 if smoke else 128
        preprocessor = kr.models.ReformerCausalLMPreprocessor(sequence_length=4096)
        backbone = kr.models.ReformerBackbone(
            vocabulary_size=preprocessor.vocabulary_size, num_layers=2,
            hidden_dim=size, intermediate_dim=2 * size, max_sequence_length=4096,
            seed=0)
        model = ReformerCausalLM(backbone, preprocessor=preprocessor)
    if not isinstance(model, ReformerCausalLM) or model.preprocessor is None:
        raise SystemExit(f"--model {model_path}: needs a ReformerCausalLM with its "
                         f"preprocessor (got {type(model).__name__})")
    return model


def export(model, export_dir, version=1):
    """The example's export of `model` (text signatures included); its path."""
    import keras_reformer as kr

    return kr.export.export_saved_model(model, export_dir, version=version,
                                        text_signature=True, overwrite=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a byte-level ReformerCausalLM with its "
                   "preprocessor: a keras-hub preset folder (e.g. train_lm.py's "
                   "<run-dir>/preset) or a .keras file")
    p.add_argument("--export-dir", default=None)
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)

    model = load_or_build(args.model, args.smoke)
    vocabulary = model.backbone.vocabulary_size
    export_dir = args.export_dir or tempfile.mkdtemp(prefix="reformer_export_")
    path = export(model, export_dir, args.version)
    print(f"exported: {path}")

    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", path, "--tag_set", "serve",
                            "--signature_def", "serving_default"],
                           capture_output=True, text=True)
    print(f"$ saved_model_cli show --dir {path} --tag_set serve "
          "--signature_def serving_default\n" + shown.stdout)

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # TF's own CLI runs the text signature: stock TensorFlow loads every op.
    text = "héllo, wörld"
    with tempfile.TemporaryDirectory(prefix="reformer_cli_") as out:
        run_args = ["saved_model_cli", "run", "--dir", path, "--tag_set", "serve",
                    "--signature_def", "generate_text", "--input_exprs",
                    "text=" + json.dumps([text], ensure_ascii=False)
                    + ";max_length=24"]
        ran = subprocess.run([cli, *run_args[1:], "--outdir", out, "--overwrite"],
                             capture_output=True, text=True, env=env)
        if ran.returncode != 0:
            raise SystemExit("saved_model_cli run failed:\n" + ran.stderr[-2000:])
        generated = np.load(os.path.join(out, "text.npy"), allow_pickle=True)[0]
    print("$ " + shlex.join(run_args))
    print(f"  -> text [1]: {generated.decode('utf-8', 'replace')!r}\n")

    served = subprocess.run([sys.executable, "-c", SERVE, path], capture_output=True,
                            text=True, env=env)
    if served.returncode != 0:
        raise SystemExit("serving check failed:\n" + served.stderr[-2000:])
    result = json.loads(served.stdout.strip().splitlines()[-1])
    print(f"fresh process without keras: logits {result['logits_shape']}, "
          f"generate_text {result['texts']}")

    base = os.path.abspath(export_dir)
    print(textwrap.dedent(f"""
        Serve it (the base path holds the version folders):
          docker run --rm -p 8501:8501 -v "{base}:/models/reformer" \\
            -e MODEL_NAME=reformer tensorflow/serving
          # or: tensorflow_model_server --rest_api_port=8501 \\
          #       --model_name=reformer --model_base_path="{base}"
        Ask it:
          curl -s http://localhost:8501/v1/models/reformer:predict \\
            -d '{{"instances": [[100, 101, 102, 32, 109]]}}'
          # -> {{"predictions": [[[...{vocabulary} logits...] x 5 positions]]}}
          curl -s http://localhost:8501/v1/models/reformer:predict \\
            -d '{{"signature_name": "generate_text",
                 "inputs": {{"text": ["def main("], "max_length": 64}}}}'
          # -> {{"outputs": ["def main(..."]}}  (greedy, cached decoding)
    """))


if __name__ == "__main__":
    main()
