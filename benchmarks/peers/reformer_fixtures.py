"""Golden fixtures for checkpoint import: HF transformers' Reformer, small.

Builds `ReformerModelWithLMHead` in the layout of each public checkpoint
(google/reformer-enwik8, google/reformer-crime-and-punishment) at a small
size with random weights and a fixed `hash_seed`, saves it with
`save_pretrained` (config.json, model.safetensors) and writes what it
computes in eval mode: per-layer hidden states and logits for a full batch
and for a right-padded one, and the hash rotations every LSH layer used
(HF reseeds torch with `hash_seed` before each draw, so all LSH layers of a
model use the same rotations).

It also writes what the checkpoints' tokenizers make of a few texts
(`golden_tokens.json`): for enwik8 the model card's rule (UTF-8 bytes + 2);
for crime-and-punishment a small BPE SentencePiece model with its 320
pieces, trained here on Python's standard library and saved as
`spiece.model` (the checkpoint's file name), run through HF's
`ReformerTokenizer`.

Runs in the peer venv, never in the library's:

    bash benchmarks/peers/setup.sh
    benchmarks/peers/.venv/bin/python benchmarks/peers/reformer_fixtures.py

writes tests/fixtures/hf_reformer_<layout>/ (a few hundred KB in all).
The tests read them with NumPy only; no test needs torch.
"""

import argparse
import glob
import io
import json
import os
import sysconfig

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LENGTH = 64  # a multiple of every chunk length below

# The checkpoints' layouts (attention pattern, hashing, FFN, embeddings),
# shrunk: width 16, 2 heads of 8, FFN 32, chunks of 8 (LSH) and 4 (local).
LAYOUTS = {
    "enwik8": dict(
        vocab_size=258,
        attn_layers=["local", "local", "lsh", "local", "local", "lsh"],
        num_hashes=4, num_buckets=8,
        lsh_attn_chunk_length=8, local_attn_chunk_length=4,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[4, 12],
    ),
    "crime_and_punishment": dict(
        vocab_size=320,
        attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"],
        num_hashes=1, num_buckets=[4, 4],
        lsh_attn_chunk_length=8, local_attn_chunk_length=8,
        axial_pos_shape=[8, 16], axial_pos_embds_dim=[4, 12],
    ),
}


def build(layout, seed):
    import torch
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.manual_seed(seed)
    config = ReformerConfig(
        is_decoder=True, hidden_size=16, num_attention_heads=2,
        attention_head_size=8, feed_forward_size=32, hidden_act="relu",
        lsh_num_chunks_before=1, lsh_num_chunks_after=0,
        local_num_chunks_before=1, local_num_chunks_after=0,
        hash_seed=seed, max_position_embeddings=128, axial_pos_embds=True,
        hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, chunk_size_lm_head=0,
        eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
        **LAYOUTS[layout],
    )
    model = ReformerModelWithLMHead(config).eval()
    with torch.no_grad():
        # HF initializes axial embeddings and LayerNorms to constants: draw
        # every parameter so that a wrong mapping cannot hide.
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


def rotations(model):
    """The rotations HF's LSH layers draw: reseeded, then one randn."""
    import torch

    config = model.config
    buckets = config.num_buckets
    size = buckets if isinstance(buckets, int) else sum(buckets)
    torch.manual_seed(config.hash_seed)
    shape = (config.num_attention_heads, config.attention_head_size,
             config.num_hashes, size // 2)
    return torch.randn(shape).numpy()


def run(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return out.logits.numpy(), np.stack([h.numpy() for h in out.hidden_states], 1)


TEXTS = [
    "A few months later, Raskolnikov  walked\tout.",
    "def f(x):\n    return x ** 2",
    "h\u00e9llo w\u00f6rld \u2211 \u65e5\u672c",
    "",
]


def train_sentence_piece(vocab_size):
    """A BPE SentencePiece model (bytes) with `vocab_size` pieces: <pad> 0,
    </s> 1, <unk> 2, as the reference's tokenizer names them."""
    import sentencepiece

    root = sysconfig.get_paths()["stdlib"]
    lines = []
    for path in sorted(glob.glob(os.path.join(root, "*.py")))[:20]:
        with open(path, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, minloglevel=2, num_threads=1,
    )
    return model.getvalue()


def token_fixture(layout, folder, vocab_size):
    if layout == "enwik8":
        # google/reformer-enwik8's model card: ids are UTF-8 bytes + 2.
        ids = [[b + 2 for b in text.encode("utf-8")] for text in TEXTS]
        decoded = TEXTS
    else:
        from transformers import ReformerTokenizer

        with open(os.path.join(folder, "spiece.model"), "wb") as f:
            f.write(train_sentence_piece(vocab_size))
        tokenizer = ReformerTokenizer.from_pretrained(folder)
        ids = [tokenizer(text)["input_ids"] for text in TEXTS]
        decoded = [tokenizer.decode(row) for row in ids]
    with open(os.path.join(folder, "golden_tokens.json"), "w") as f:
        json.dump(dict(texts=TEXTS, token_ids=ids, decoded=decoded), f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    for layout in LAYOUTS:
        model = build(layout, args.seed)
        folder = os.path.join(args.out, f"hf_reformer_{layout}")
        model.save_pretrained(folder)
        rng = np.random.default_rng(args.seed)
        vocab = model.config.vocab_size
        ids = rng.integers(1, vocab, (2, LENGTH)).astype(np.int64)
        full = np.ones_like(ids)
        padded = full.copy()
        padded[1, LENGTH - 21:] = 0  # row 1: 43 real tokens, then padding
        logits, hidden = run(model, ids, full)
        padded_logits, padded_hidden = run(model, ids * padded, padded)
        np.savez_compressed(
            os.path.join(folder, "golden.npz"),
            token_ids=ids, padding_mask=padded, rotations=rotations(model),
            logits=logits, hidden_states=hidden,
            padded_logits=padded_logits, padded_hidden_states=padded_hidden,
        )
        info = dict(transformers=transformers.__version__, seed=args.seed,
                    hidden_states="(batch, layers + 1, length, 2 * hidden): the "
                    "concatenated streams before each layer and after the last")
        with open(os.path.join(folder, "golden.json"), "w") as f:
            json.dump(info, f, indent=1)
        token_fixture(layout, folder, model.config.vocab_size)
        print(folder, {k: v.shape for k, v in np.load(
            os.path.join(folder, "golden.npz")).items()})


if __name__ == "__main__":
    main()
