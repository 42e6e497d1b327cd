"""Import a pretrained Reformer of HF transformers and generate from it.

The two public pretrained Reformers (google/reformer-enwik8,
google/reformer-crime-and-punishment) exist as PyTorch checkpoints. This
reads a checkpoint directory (config.json and model.safetensors, no torch
needed; spiece.model when the checkpoint has one), builds the matching
`ReformerCausalLM` with the checkpoint's tokenizer, generates a greedy
continuation of a text prompt, and saves it as a keras-hub preset:

    huggingface-cli download google/reformer-enwik8 --local-dir ckpt/enwik8
    python examples/import_transformers.py --checkpoint ckpt/enwik8 \
        --prompt "The Reformer " --preset runs/enwik8_preset

    python examples/import_transformers.py --smoke   # a small checkpoint from tests/fixtures

enwik8's tokenizer (UTF-8 bytes + 2) comes with the import;
crime-and-punishment's is its `spiece.model` (SentencePiece). A checkpoint
with neither takes `--prompt-ids`. Runs offline: the checkpoint is a local
folder.
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
    p.add_argument("--prompt", default="The Reformer ",
                   help="text, tokenized by the checkpoint's tokenizer")
    p.add_argument("--prompt-ids", type=int, nargs="+", default=None,
                   help="the prompt as token ids (for a checkpoint without a tokenizer)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--preset", default=None, help="save the imported model here")
    p.add_argument("--smoke", action="store_true",
                   help="import tests/fixtures' small enwik8-layout checkpoint")
    args = p.parse_args(argv)
    if args.smoke and args.checkpoint is None:
        args.checkpoint = SMOKE
        args.new_tokens = min(args.new_tokens, 8)
        if args.preset is None:
            args.preset = os.path.join(tempfile.mkdtemp(prefix="imported_"), "preset")
    if args.checkpoint is None:
        p.error("--checkpoint is required (or --smoke)")
    if args.new_tokens < 1:
        p.error(f"--new-tokens must be >= 1, got {args.new_tokens}")

    import numpy as np

    from keras_reformer.models import ReformerCausalLM

    lm = ReformerCausalLM.from_transformers(args.checkpoint)
    backbone = lm.backbone
    tokenizer = lm.preprocessor.tokenizer if lm.preprocessor is not None else None
    print(f"imported {args.checkpoint}: {backbone.num_layers} layers "
          f"({', '.join(backbone.attention_types)}), hidden_dim {backbone.hidden_dim}, "
          f"vocabulary {backbone.vocabulary_size}, {lm.count_params():,} parameters, "
          f"tokenizer {type(tokenizer).__name__ if tokenizer else 'none (ids)'}")
    lm.compile(sampler="greedy")
    if args.prompt_ids is None and tokenizer is not None:
        length = len(np.asarray(tokenizer(args.prompt))) + args.new_tokens
        text = lm.generate(args.prompt, max_length=length, stop_token_ids=None)
        print("generated (greedy):", repr(text))
        new = text
    else:
        if args.prompt_ids is None:
            p.error("this checkpoint has no tokenizer: give --prompt-ids")
        prompt = np.array([args.prompt_ids], "int32")
        width = prompt.shape[1] + args.new_tokens
        ids = np.pad(prompt, [[0, 0], [0, args.new_tokens]])
        mask = (np.arange(width) < prompt.shape[1])[None].astype("int32")
        out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        new = [int(t) for t in out["token_ids"][0, prompt.shape[1]:]]
        print("generated ids (greedy):", new)
    if args.preset:
        lm.save_to_preset(args.preset)
        print(f"saved the keras-hub preset {args.preset}")
    return new


if __name__ == "__main__":
    main()
