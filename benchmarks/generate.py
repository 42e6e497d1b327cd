"""Generation speed: keras-hub's `generate()` on a ReformerCausalLM (cached
decoding) vs the uncached loop (a full forward pass per token).

Setup: one causal ReformerCausalLM for all points (a
ReformerBackbone of 2 layers, d_model 256, 4 heads x 64, bucket 64, 2
hashes, byte vocabulary with start and end tokens: 258), its
`max_sequence_length` the longest prompt plus the new tokens, so every
prompt length sees the same bucket count. Batch `--batch` (default 1), greedy
(`lm.compile(sampler="greedy")`), no stop tokens. Each point runs in a
fresh process.

- cached: keras-hub's `ReformerCausalLM.generate` compiled with XLA
  (`lm.compile(sampler="greedy", jit_compile=True)`: keras-hub wraps its
  generate step in `tf.function(jit_compile=True)`), one compiled loop.
  Prompts are right-padded `{"token_ids", "padding_mask"}` whose width is
  the output length. Two timed runs after a warm-up (compilation):
  width `prompt + 1` (the prompt pass and one token) and `prompt +
  new_tokens`; the difference over `new_tokens - 1` is the per-token decode
  time, which should not grow with the prompt.
- cached_graph: the same `generate()` compiled without XLA
  (`jit_compile=False`: a TensorFlow graph loop, whose steps write the
  caches in place), timed the same way.
- uncached: a full forward pass of the LM over the padded sequence per
  token (one traced `tf.function`, greedy), `--uncached-tokens` tokens
  (each a pass over the whole prefix, so a few are enough), per-token =
  total / tokens.
- torch: the PyTorch Reformer (HF transformers) `generate(use_cache=True)`,
  same shape and bucket count, timed the same way
  (benchmarks/peers/hf_generate.py, in the peer's venv: run
  `bash benchmarks/peers/setup.sh` first).

`--rounds N` alternates the kinds' processes N times per prompt and reports
the median (min, max) of each and the cached / torch ratio of the medians:
the machines are shared, only ratios from one run count.

    python benchmarks/generate.py                       # 512, 4K, 16K
    python benchmarks/generate.py --smoke               # tiny model, short prompts
    python benchmarks/generate.py --prompts 64 128 --new-tokens 8 --tiny   # smoke
    python benchmarks/generate.py --kinds cached cached_graph torch uncached --rounds 3
    python benchmarks/generate.py --peer-table generate_64k.csv generate_batch8.csv

Writes benchmarks/results/generate.csv and docs/generate_benchmark.png
(another --csv: that CSV only; with --smoke: the git-ignored
tmp_generate_smoke.csv, no figure).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FULL = dict(num_layers=2, hidden_dim=256, num_heads=4, bucket_size=64, num_hashes=2)
TINY = dict(num_layers=1, hidden_dim=32, num_heads=2, bucket_size=8, num_hashes=2)


def build(max_length, tiny):
    """The benchmark's ReformerCausalLM (no preprocessor: token ids in and out)."""
    import keras_reformer as kr

    shape = TINY if tiny else FULL
    backbone = kr.models.ReformerBackbone(
        258, max_sequence_length=max_length, seed=0,
        feedforward_chunk_size=shape["bucket_size"] * 2, **shape,
    )
    return kr.models.ReformerCausalLM(backbone)


def padded_prompt(ids, width):
    """keras-hub's token-id prompt: right-padded to `width`, the output length."""
    import numpy as np

    batch, prompt = ids.shape
    token_ids = np.zeros((batch, width), np.int32)
    token_ids[:, :prompt] = ids
    padding_mask = np.zeros((batch, width), bool)
    padding_mask[:, :prompt] = True
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def cached_timing(lm, ids, new_tokens, repeats, jit):
    """keras-hub's `generate()` (greedy) from the prompt `ids`, compiled with
    XLA or not: best of `repeats` runs of width `prompt + 1` (the prompt
    pass and one token) and of `prompt + new_tokens`; the difference over
    `new_tokens - 1` is the per-token decode time (one step, all rows);
    tokens/s counts every row's token."""
    batch, prompt = ids.shape
    lm.compile(sampler="greedy", jit_compile=jit)

    def run(total):
        inputs = padded_prompt(ids, total)
        return lambda: lm.generate(inputs, stop_token_ids=None)

    short, long = run(prompt + 1), run(prompt + new_tokens)
    out = short()
    long()  # compile both
    # The prompt comes back unchanged, and the new token is a real one.
    assert (out["token_ids"][:, :prompt] == ids).all() and out["padding_mask"].all()
    t_short = _common.best_time(short, repeats)
    t_long = _common.best_time(long, repeats)
    per_token = (t_long - t_short) / (new_tokens - 1)
    return dict(new_tokens=new_tokens, seconds=t_long, prompt_ms=1e3 * t_short,
                per_token_ms=1e3 * per_token, tokens_per_s=batch / per_token, jit=jit)


def point(kind, prompt, new_tokens, uncached_tokens, max_length, repeats, tiny,
          batch=1):
    import numpy as np
    import tensorflow as tf

    lm = build(max_length, tiny)
    ids = np.random.default_rng(0).integers(0, 256, size=(batch, prompt)).astype(np.int32)
    record = dict(kind=kind, prompt=prompt, batch=batch, max_sequence_length=max_length,
                  device="GPU" if tf.config.list_physical_devices("GPU") else "CPU")
    if kind in ("cached", "cached_graph"):
        record.update(cached_timing(lm, ids, new_tokens, repeats, jit=kind == "cached"))
    else:
        width = prompt + uncached_tokens

        @tf.function
        def next_token(token_ids, padding_mask, index):
            logits = lm({"token_ids": token_ids, "padding_mask": padding_mask},
                        training=False)
            return tf.argmax(logits[:, index - 1], axis=-1, output_type=tf.int32)

        def run(tokens):
            inputs = padded_prompt(ids, width)
            token_ids = tf.constant(inputs["token_ids"])
            padding_mask = tf.constant(inputs["padding_mask"], tf.int32)
            rows = tf.range(batch)
            for index in range(prompt, prompt + tokens):
                token = next_token(token_ids, padding_mask, tf.constant(index))
                at = tf.stack([rows, tf.fill([batch], index)], axis=1)
                token_ids = tf.tensor_scatter_nd_update(token_ids, at, token)
                padding_mask = tf.tensor_scatter_nd_update(
                    padding_mask, at, tf.ones([batch], tf.int32))
            return token_ids

        run(1)  # trace
        seconds = _common.best_time(lambda: run(uncached_tokens), repeats)
        record.update(new_tokens=uncached_tokens, seconds=seconds,
                      per_token_ms=1e3 * seconds / uncached_tokens,
                      tokens_per_s=batch * uncached_tokens / seconds, jit=False)
    _common.emit(record)


def torch_peer_point(prompt, new_tokens, max_length, repeats, batch=1):
    """The PyTorch peer's `generate(use_cache=True)` (HF transformers'
    ReformerModelWithLMHead, benchmarks/peers/hf_generate.py) with the same
    shape and bucket count (`--max-length`), in its own venv and process.
    Returns a record with the keys of `point`'s."""
    record = _common.run_peer("hf_generate.py", [
        "--prompt-length", prompt, "--new-tokens", new_tokens,
        "--max-length", max_length, "--repeats", repeats, "--batch", batch])
    record.update(kind="torch", prompt=prompt, batch=batch)
    if record.get("status") == "ok":
        record.update(per_token_ms=1e3 * record["per_token_s"],
                      prompt_ms=1e3 * record["prompt_s"], jit=False)
    return record


def summarise(rows, kinds):
    """Median (min, max) per (kind, prompt) over the rounds, and the ratio of
    cached to the peer's tokens/s from the same run."""
    import statistics

    table = []
    for prompt in sorted({r["prompt"] for r in rows}):
        medians = {}
        for kind in kinds:
            ok = [r["tokens_per_s"] for r in rows if r["prompt"] == prompt
                  and r["kind"] == kind and r.get("status") == "ok"]
            if ok:
                medians[kind] = statistics.median(ok)
                table.append(dict(kind=kind, prompt=prompt, runs=len(ok),
                                  tokens_per_s=medians[kind],
                                  tokens_per_s_min=min(ok), tokens_per_s_max=max(ok)))
        if "cached" in medians and "torch" in medians:
            _common.progress(f"prompt {prompt}: cached {medians['cached']:.1f} tok/s, "
                             f"torch {medians['torch']:.1f}: "
                             f"{medians['cached'] / medians['torch']:.2f}x")
    return table


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("cached", "cached_graph", "uncached", "torch"):
        points = sorted((r["prompt"], r["tokens_per_s"]) for r in rows
                        if r.get("kind") == kind and r.get("status") == "ok")
        if points:
            ax.plot(*zip(*points), marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("generated tokens / s (all rows)")
    ax.set_title("Generation: keras-hub generate (cached), uncached, "
                 "PyTorch peer", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def spread(values, digits):
    """`values` as the tables print them: "median (min-max)"."""
    import statistics

    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def table(rows):
    """generate.csv as docs/generation.md's table: per kind and prompt, the
    median (min-max) per-token time and prompt-pass time over the rounds,
    and the per-token time at the longest prompt over that at the shortest."""
    import statistics

    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_token_ms")]
    kinds = [k for k in ("cached", "cached_graph") if any(r["kind"] == k for r in ok)]
    prompts = sorted({int(r["prompt"]) for r in ok})
    lines = ["| generate() | prompt | ms per token | prompt pass + 1 token (ms) | "
             "per token vs the shortest prompt |", "|---|---|---|---|---|"]
    for kind in kinds:
        medians = {}
        for prompt in prompts:
            points = [r for r in ok if r["kind"] == kind and int(r["prompt"]) == prompt]
            step = [float(r["per_token_ms"]) for r in points]
            first = [float(r["prompt_ms"]) for r in points]
            medians[prompt] = statistics.median(step)
            label = "XLA (`jit_compile=True`)" if kind == "cached" else "graph (CPU default)"
            lines.append(
                f"| {label} | {prompt:,} | {spread(step, 2)} | {spread(first, 0)} | "
                f"{medians[prompt] / medians[prompts[0]]:.2f}x |")
    return "\n".join(lines)


def peer_table(rows):
    """CSVs of runs with the peer (`--kinds cached cached_graph torch`) as one
    table: per batch and prompt, the median (min-max) per-token time and
    tokens/s of each kind over the rounds, our tokens/s over the peer's, and
    each kind's per-token time over its own at the shortest prompt of the
    same batch."""
    import statistics

    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_token_ms")]
    labels = {"cached": "ours, XLA", "cached_graph": "ours, graph", "torch": "PyTorch peer"}
    lines = ["| batch | prompt | generate() | ms per token (all rows) | tokens/s "
             "| vs the peer | per token vs the shortest prompt |", "|---|---|---|---|---|---|---|"]
    for batch in sorted({int(r.get("batch") or 1) for r in ok}):
        at = [r for r in ok if int(r.get("batch") or 1) == batch]
        prompts = sorted({int(r["prompt"]) for r in at})
        first = {}
        for prompt in prompts:
            here = {kind: [r for r in at if r["kind"] == kind and int(r["prompt"]) == prompt]
                    for kind in labels}
            speed = {kind: statistics.median(float(r["tokens_per_s"]) for r in points)
                     for kind, points in here.items() if points}
            for kind, points in here.items():
                if not points:
                    continue
                step = [float(r["per_token_ms"]) for r in points]
                median = statistics.median(step)
                first.setdefault(kind, median)
                versus = (f"{speed[kind] / speed['torch']:.2f}x"
                          if kind != "torch" and "torch" in speed else "")
                lines.append(
                    f"| {batch} | {prompt:,} | {labels[kind]} | {spread(step, 2)} | "
                    f"{speed[kind]:,.0f} | {versus} | {median / first[kind]:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--uncached-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1,
                        help="prompts generated at once (tokens/s counts all rows)")
    parser.add_argument("--kinds", nargs="+", default=["cached", "uncached"],
                        choices=["cached", "cached_graph", "uncached", "torch"],
                        help="cached: keras-hub generate() under XLA; cached_graph: "
                             "the same without XLA; torch: the PyTorch peer (bash "
                             "benchmarks/peers/setup.sh)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the kinds' processes this many times per "
                             "prompt; the summary gives medians")
    parser.add_argument("--tiny", action="store_true",
                        help="a 1-layer width-32 model (smoke runs only)")
    parser.add_argument("--csv", default=None,
                        help="results file in benchmarks/results (default "
                             "generate.csv; --smoke: tmp_generate_smoke.csv, git-ignored)")
    parser.add_argument("--smoke", action="store_true",
                        help="a minute: --tiny, prompts 32 and 64, 8 new tokens, "
                             "2 uncached tokens, no figure")
    parser.add_argument("--point", nargs="+")
    parser.add_argument("--table", action="store_true",
                        help="print generate.csv as docs/generation.md's table")
    parser.add_argument("--peer-table", nargs="+", metavar="CSV",
                        help="print these CSVs (runs with --kinds ... torch) as "
                             "docs/generation.md's table against the peer")
    args = parser.parse_args()
    if args.table:
        print(table(_common.read_csv("generate.csv")))
        return
    if args.peer_table:
        print(peer_table([r for name in args.peer_table for r in _common.read_csv(name)]))
        return
    if args.smoke:
        args.tiny, args.prompts, args.new_tokens = True, [32, 64], 8
        args.uncached_tokens = 2
    if args.csv is None:
        args.csv = "tmp_generate_smoke.csv" if args.smoke else "generate.csv"
    if args.point:
        kind, prompt, new, uncached, max_length, repeats, tiny, batch = args.point
        point(kind, int(prompt), int(new), int(uncached), int(max_length),
              int(repeats), tiny == "1", int(batch))
        return
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (per-token time is a difference)")
    max_length = max(args.prompts) + max(args.new_tokens, args.uncached_tokens)
    if "torch" in args.kinds:
        _common.require_peer(parser)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1. Received: {args.rounds}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1. Received: {args.batch}")
    rows = []
    for prompt in args.prompts:
        for round_ in range(args.rounds):
            for kind in args.kinds:  # alternating processes: drift hits all kinds
                _common.progress(f"[{round_ + 1}/{args.rounds}] {kind} prompt={prompt}")
                if kind == "torch":
                    record = torch_peer_point(prompt, args.new_tokens, max_length,
                                              args.repeats, args.batch)
                else:
                    record = _common.run_point(
                        os.path.abspath(__file__),
                        [kind, prompt, args.new_tokens, args.uncached_tokens,
                         max_length, args.repeats, int(args.tiny), args.batch],
                    )
                record.setdefault("kind", kind)
                record.setdefault("prompt", prompt)
                record["round"] = round_
                rows.append(record)
                _common.progress(f"  {record}")
    summary = summarise(rows, args.kinds)
    path = _common.write_csv(args.csv, rows)
    _common.progress(f"wrote {path}")
    # The tables take their medians from the CSV itself; the figure is the
    # one docs/generation.md shows (generate.csv's), so other runs leave no
    # file that no doc cites.
    ok = [dict(r, status="ok") for r in summary]  # medians over the rounds
    if ok and args.csv == "generate.csv":
        os.makedirs(_common.DOCS, exist_ok=True)
        plot(ok, os.path.join(_common.DOCS, "generate_benchmark.png"))


if __name__ == "__main__":
    main()
