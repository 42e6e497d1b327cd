"""Import a pretrained Reformer of HF transformers and generate from it.

The two public pretrained Reformers (google/reformer-enwik8,
google/reformer-crime-and-punishment) exist as PyTorch checkpoints. This
reads a checkpoint directory (config.json and model.safetensors, no torch
needed), builds the matching `ReformerCausalLM`, checks it, generates a
continuation of token ids, and saves it as a keras-hub preset:

    huggingface-cli download google/reformer-enwik8 --local-dir ckpt/enwik8
    python examples/import_transformers.py --checkpoint ckpt/enwik8 \\
        --prompt "The Reformer " --byte-offset 2 --preset runs/enwik8_preset

    python examples/import_transformers.py --smoke   # a small checkpoint from tests/fixtures

`--byte-offset 2` turns the prompt's UTF-8 bytes into ids as enwik8's model
counts them (byte + 2); without it `--prompt-ids` takes ids directly (e.g.
from SentencePiece for crime-and-punishment). Runs offline: the checkpoint
is a local folder.
"""

import argparse
import os
import sys
import tempfile

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOKE = os.path.join(ROOT, "tests", "fixtures", "hf_reformer_enwik8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint directory (config.json, model.safetensors "
                        "or pytorch_model.bin)")
    p.add_argument("--prompt", default=None,
                   help="text; with --byte-offset its UTF-8 bytes + offset are the ids")
    p.add_argument("--byte-offset", type=int, default=None,
                   help="ids = byte + this (2 for reformer-enwik8)")
    p.add_argument("--prompt-ids", type=int, nargs="+", default=None,
                   help="the prompt as token ids")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--preset", default=None, help="save the imported model here")
    p.add_argument("--smoke", action="store_true",
                   help="import tests/fixtures' small enwik8-layout checkpoint")
    args = p.parse_args(argv)
    if args.smoke and args.checkpoint is None:
        args.checkpoint = SMOKE
        args.byte_offset = 2 if args.byte_offset is None else args.byte_offset
        args.new_tokens = min(args.new_tokens, 8)
        if args.preset is None:
            args.preset = os.path.join(tempfile.mkdtemp(prefix="imported_"), "preset")
    if args.checkpoint is None:
        p.error("--checkpoint is required (or --smoke)")
    if args.prompt_ids is None:
        if args.byte_offset is None:
            p.error("give --prompt-ids, or --prompt with --byte-offset")
        text = "The Reformer " if args.prompt is None else args.prompt
        args.prompt_ids = [b + args.byte_offset for b in text.encode("utf-8")]
    if args.new_tokens < 1:
        p.error(f"--new-tokens must be >= 1, got {args.new_tokens}")

    import numpy as np

    from keras_reformer.models import ReformerCausalLM

    lm = ReformerCausalLM.from_transformers(args.checkpoint)
    backbone = lm.backbone
    print(f"imported {args.checkpoint}: {backbone.num_layers} layers "
          f"({', '.join(backbone.attention_types)}), hidden_dim {backbone.hidden_dim}, "
          f"vocabulary {backbone.vocabulary_size}, {lm.count_params():,} parameters")
    prompt = np.array([args.prompt_ids], "int32")
    width = prompt.shape[1] + args.new_tokens
    ids = np.pad(prompt, [[0, 0], [0, args.new_tokens]])
    mask = (np.arange(width) < prompt.shape[1])[None].astype("int32")
    lm.compile(sampler="greedy")
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    new = [int(t) for t in out["token_ids"][0, prompt.shape[1]:]]
    print("generated ids (greedy):", new)
    if args.byte_offset is not None:
        data = bytes(max(0, t - args.byte_offset) % 256 for t in new)
        print("as text:", repr(data.decode("utf-8", errors="replace")))
    if args.preset:
        lm.save_to_preset(args.preset)
        print(f"saved the keras-hub preset {args.preset}")
    return new


if __name__ == "__main__":
    main()
