"""Training and decoding speed of the google/reformer-enwik8 layout, ours and the peer's.

The pretrained enwik8 Reformer's full layout (12 layers of width 1024, 8 heads
of 128, local/local/LSH pattern with 4 rounds of 512 buckets, LSH chunks of
256, local chunks of 128, FFN 4096 with ReLU, axial positions [128, 512] x
[256, 768], vocabulary 258), random weights, dropout off, batch 1. Ours is
built as `ReformerCausalLM.from_transformers` builds it
(`reference_rules=True`, graph mode: the default on CPU); the peer is HF
transformers' `ReformerModelWithLMHead` with the same config (the PyTorch
venv of benchmarks/peers).

- **train**: one training step (forward with labels, backward, Adam) at
  `length` tokens; the best of `--steps` after one untimed step. HF's
  training mode requires the axial shape to multiply to the length, so both
  sides use `(length / 2^k, 2^k)` near the square root for this (the
  embedding's cost, not the layers', changes).
- **decode**: greedy generation of `--new-tokens` after a prompt of
  `length - new_tokens` tokens, with the checkpoint's axial shape. Ours runs
  a full pass over the text so far for each token (the reference's LSH rule
  is not prefix-stable: no cache is exact); the peer runs
  `generate(use_cache=True)`, which reuses its cached buckets. Both sides
  time a one-token run (prompt_s: the prompt's pass) and a `new_tokens` run,
  each after an untimed run of the same shape; per_token_s is their
  difference over `new_tokens - 1`.

Processes alternate, ours first, `--repeats` pairs per point:

    python benchmarks/enwik8_layout.py --lengths 4096 --kinds train decode --repeats 2
    python benchmarks/enwik8_layout.py --lengths 65536 --no-peer --repeats 1 \
        --new-tokens 2 --csv enwik8_layout_64k.csv
    python benchmarks/enwik8_layout.py --table enwik8_layout.csv enwik8_layout_64k.csv

writes benchmarks/results/enwik8_layout.csv.
"""

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# google/reformer-enwik8's config.json, dropout off (timing, not training).
CONFIG = dict(
    model_type="reformer", is_decoder=True, vocab_size=258, hidden_size=1024,
    num_attention_heads=8, attention_head_size=128, feed_forward_size=4096,
    hidden_act="relu",
    attn_layers=["local", "local", "lsh", "local", "local", "local", "lsh",
                 "local", "local", "local", "lsh", "local"],
    num_hashes=4, num_buckets=512, lsh_attn_chunk_length=256,
    local_attn_chunk_length=128, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0,
    axial_pos_embds=True, axial_pos_shape=[128, 512], axial_pos_embds_dim=[256, 768],
    max_position_embeddings=65536, layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0, chunk_size_feed_forward=0,
    chunk_size_lm_head=0, pad_token_id=0, eos_token_id=None, hash_seed=0,
)


def config_for(kind, length):
    """The layout's config for one point (training: an axial shape of `length`)."""
    config = dict(CONFIG)
    if kind == "train":
        first = 2 ** round(math.log2(length) / 2)
        config["axial_pos_shape"] = [first, length // first]
        config["max_position_embeddings"] = length
    return config


def ours(kind, length, steps, new_tokens):
    import keras
    import numpy as np

    from keras_reformer.convert.transformers_reformer import backbone_arguments
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    keras.utils.set_random_seed(0)
    lm = ReformerCausalLM(ReformerBackbone(**backbone_arguments(config_for(kind, length))))
    rng = np.random.default_rng(0)
    if kind == "train":
        ids = rng.integers(2, 258, (1, length + 1)).astype("int32")
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((1, length), "int32")}
        lm.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False,
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        lm.train_on_batch(x, ids[:, 1:])  # traces
        best = _common.best_time(lambda: lm.train_on_batch(x, ids[:, 1:]), steps)
        return dict(step_s=round(best, 2), tokens_per_s=round(length / best, 1))
    prompt = length - new_tokens
    ids = np.zeros((1, length), "int32")
    ids[0, :prompt] = rng.integers(2, 258, prompt)
    mask = (np.arange(length) < prompt)[None].astype("int32")
    lm.compile(sampler="greedy")

    def run(new):
        width = prompt + new
        start = time.perf_counter()
        lm.generate({"token_ids": ids[:, :width], "padding_mask": mask[:, :width]},
                    stop_token_ids=None)
        return time.perf_counter() - start

    return timed_generation(run, new_tokens)


def timed_generation(run, new_tokens):
    """One new token (prompt_s: the prompt's pass) and `new_tokens`, each
    timed after an untimed run of the same shape (ours traces per width);
    per_token_s is their difference over the extra tokens. The same rule on
    both sides."""
    run(1)
    first = run(1)
    run(new_tokens)
    total = run(new_tokens)
    return dict(prompt_s=round(first, 2), decode_s=round(total, 2),
                per_token_s=round((total - first) / (new_tokens - 1), 3))


def point(args):
    kind, length, steps, new_tokens = args.point[0], *map(int, args.point[1:])
    record = dict(side="ours", kind=kind, length=length)
    record.update(ours(kind, length, steps, new_tokens))
    record["peak_rss_mb"] = round(_common.peak_rss_mb())
    _common.emit(record)


# The table's lines: (kind, CSV column, what it is, higher is faster).
LINES = [
    ("train", "tokens_per_s", "training step (tokens/s)", True),
    ("decode", "prompt_s", "decoding: prompt pass and first token (s)", False),
    ("decode", "per_token_s", "decoding: each further token (s)", False),
]


def table(rows):
    """Medians of the repeats: ours and the peer side by side per point."""
    groups, failed = {}, {}
    for row in rows:
        key = (row["kind"], row["side"])
        if row.get("status", "ok") != "ok":
            # rc=-9: killed, on this machine by the kernel for memory.
            failed[(int(row["length"]),) + key] = (
                "killed" if "rc=-9" in row["status"] else "failed")
            groups.setdefault(int(row["length"]), {}).setdefault(key, [])
            continue
        groups.setdefault(int(row["length"]), {}).setdefault(key, []).append(row)

    def show(value, digits, length=None, kind=None, side=None):
        if value is None:
            return failed.get((length, kind, side), "-")
        return f"{value:,.{digits}f}"

    lines = ["| what | length | ours | peer | ours / peer speed | peak RSS MiB ours / peer | runs ours / peer |",
             "|---|---|---|---|---|---|---|"]
    for length, sides in sorted(groups.items()):
        for kind, column, what, higher_is_faster in LINES:
            found = {side: sides.get((kind, side), []) for side in ("ours", "peer")}
            if not any((kind, side) in sides for side in found):
                continue
            median = {side: statistics.median(float(r[column]) for r in found[side])
                      if found[side] else None for side in found}
            rss = {side: max((float(r["peak_rss_mb"]) for r in found[side]), default=None)
                   for side in found}
            ratio = "-"
            if median["ours"] and median["peer"]:
                ratio = median["ours"] / median["peer"]
                ratio = f"{ratio if higher_is_faster else 1 / ratio:.2f}x"
            digits = 0 if higher_is_faster else 2
            lines.append(
                f"| {what} | {length:,} | {show(median['ours'], digits, length, kind, 'ours')} | "
                f"{show(median['peer'], digits, length, kind, 'peer')} | {ratio} | {show(rss['ours'], 0)} / "
                f"{show(rss['peer'], 0)} | {len(found['ours'])} / {len(found['peer'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--kinds", nargs="+", choices=["train", "decode"],
                        default=["train", "decode"])
    parser.add_argument("--steps", type=int, default=1, help="timed training steps")
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="process pairs per point")
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--csv", default="enwik8_layout.csv")
    parser.add_argument("--table", nargs="+", metavar="CSV",
                        help="print these CSVs' table (benchmarks/results/) and exit")
    args = parser.parse_args()
    if args.table:
        print(table([row for name in args.table for row in _common.read_csv(name)]))
        return
    if args.point:
        point(args)
        return
    for length in args.lengths:
        if length % 256 or length > 65536:
            parser.error(f"--lengths must be multiples of 256 up to 65536; got {length}")
    if args.steps < 1 or args.repeats < 1 or args.new_tokens < 2:
        parser.error("--steps and --repeats must be >= 1, --new-tokens >= 2")
    if not args.no_peer:
        _common.require_peer(parser)
    rows = []
    for length in args.lengths:
        for kind in args.kinds:
            for repeat in range(args.repeats):
                _common.progress(f"{kind} {length}: ours, pair {repeat + 1}")
                row = _common.run_point(__file__, [kind, length, args.steps, args.new_tokens],
                                        timeout=7200)
                rows.append({"side": "ours", "kind": kind, "length": length, **row})
                _common.progress(str(rows[-1]))
                if not args.no_peer:
                    _common.progress(f"{kind} {length}: peer, pair {repeat + 1}")
                    row = _common.run_peer("hf_enwik8_layout.py", [
                        "--kind", kind, "--length", length, "--steps", args.steps,
                        "--new-tokens", args.new_tokens], timeout=7200)
                    rows.append({"side": "peer", "kind": kind, "length": length, **row})
                    _common.progress(str(rows[-1]))
                _common.write_csv(args.csv, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
