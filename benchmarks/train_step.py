"""Tokens/s, peak RSS and model FLOP utilisation of a full training step.

Reference configuration (issue 6): causal ReformerModel, 2 layers, d_model
256, 4 heads x 64, FFN 1024, bucket 64, 2 hashes, vocabulary 256, batch 1,
Adam. Baseline: the same model built from `keras.layers.MultiHeadAttention`
with ordinary residual blocks (no reversible stack, unchunked FFN).

Each point is a fresh process: build, compile (`jit_compile` on or off),
two warm-up steps, then the best of `--steps` timed `train_on_batch` calls.
The first point of every run measures this machine's fp32 matmul rate
(also in a fresh process), and model FLOP utilisation is

    MFU = (analytic FLOPs per token of the step) * tokens/s / matmul rate,

counting everything the step computes, recomputations included.

    python benchmarks/train_step.py                       # 1K..128K, CSV + plot
    python benchmarks/train_step.py --lengths 4096 --models reformer
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIG = dict(vocabulary_size=256, num_layers=2, hidden_dim=256, num_heads=4,
              key_dim=64, intermediate_dim=1024, bucket_size=64, num_hashes=2)


def num_buckets(length, bucket_size=64, factorize_above=256):
    """Bucket count of LSHAttention's derived rule, as (per-hash sizes)."""
    import math

    n = max(2, 2 * math.ceil(length / bucket_size))
    if n <= factorize_above:
        return (n,)
    first = 2 * math.ceil(math.sqrt(n) / 2)
    return (first, 2 * math.ceil(n / first / 2))


def flops_per_token(model, length):
    """Analytic FLOPs per token of one training step (2 per multiply-add)."""
    d, h, k = CONFIG["hidden_dim"], CONFIG["num_heads"], CONFIG["key_dim"]
    ff, c, r = CONFIG["intermediate_dim"], CONFIG["bucket_size"], CONFIG["num_hashes"]
    vocab, layers = CONFIG["vocabulary_size"], CONFIG["num_layers"]
    projections = 2 * d * h * k * 3  # qk (or q and k), v, output
    ffn = 2 * 2 * d * ff
    if model == "mha":
        projections = 2 * d * h * k * 4
        # Causal masking does not skip work: all L keys are scored.
        attention = 2 * 2 * h * k * length
        block = projections + attention + ffn
        head = 2 * d * vocab
        return layers * block * 3 + head * 3  # forward + 2x backward
    window = 2 * c  # one chunk back
    hashing = 2 * h * r * k * sum(n // 2 for n in num_buckets(length, c))
    attention = 2 * 2 * h * r * k * window
    # Forward, recomputation by the reversible stack, 2x backward; the
    # chunked FFN recomputes its slices once more in its own backward, and
    # so does the chunk attention above 2^23 logits per row group.
    looped = length * window >= 2**23 / (h * r)  # rows do not fit in one group
    block = 4 * (projections + hashing + attention + ffn) + ffn
    if looped:
        block += attention
    head = 2 * 2 * d * vocab  # concat of both streams (2d) -> vocabulary
    return layers * block + 3 * head


def build(model, length, jit):
    import keras

    import keras_reformer as kr

    keras.utils.set_random_seed(0)
    if model == "reformer":
        net = kr.models.ReformerModel(
            **CONFIG, max_sequence_length=length, causal=True, dropout=0.0,
            attention_dropout=0.0, seed=0,
        )
    else:
        d = CONFIG["hidden_dim"]
        tokens = keras.Input((length,), dtype="int32")
        # (No position embedding: its cost is negligible either way.)
        x = keras.layers.Embedding(CONFIG["vocabulary_size"], d)(tokens)
        for _ in range(CONFIG["num_layers"]):
            y = keras.layers.LayerNormalization()(x)
            y = keras.layers.MultiHeadAttention(CONFIG["num_heads"], CONFIG["key_dim"])(
                y, y, use_causal_mask=True
            )
            x = x + y
            y = keras.layers.LayerNormalization()(x)
            y = keras.layers.Dense(CONFIG["intermediate_dim"], activation="gelu")(y)
            x = x + keras.layers.Dense(d)(y)
        x = keras.layers.LayerNormalization()(x)
        net = keras.Model(tokens, keras.layers.Dense(CONFIG["vocabulary_size"])(x))
    net.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return net


def point(model, length, jit, steps):
    import numpy as np

    net = build(model, length, jit)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(1, length)).astype("int32")
    y = np.roll(x, -1, axis=1)
    if model == "reformer":
        x = {"token_ids": x, "padding_mask": np.ones_like(x)}
    base = _common.current_rss_mb()
    for _ in range(2):
        net.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        net.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    _common.emit({
        "model": model, "length": length, "jit": jit,
        "step_s": round(seconds, 4), "tokens_per_s": round(length / seconds),
        "peak_rss_mb": round(_common.peak_rss_mb()),
        "step_mem_mb": round(_common.peak_rss_mb() - base),
        "flops_per_token": round(flops_per_token(model, length)),
    })


def matmul_point():
    """Best fp32 GFLOP/s of large and model-shaped matmuls on this machine."""
    import tensorflow as tf

    best = 0.0
    for m, kdim, n in ((2048, 2048, 2048), (8192, 256, 1024), (8192, 1024, 256)):
        a = tf.random.normal((m, kdim))
        b = tf.random.normal((kdim, n))
        fn = tf.function(lambda a, b: tf.matmul(a, b))
        fn(a, b).numpy()
        for _ in range(10):
            start = time.perf_counter()
            fn(a, b).numpy()
            best = max(best, 2 * m * kdim * n / (time.perf_counter() - start) / 1e9)
    _common.emit({"matmul_gflops": round(best, 1)})


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in ("reformer", "mha"):
        for jit in (False, True):
            ok = [r for r in rows if r.get("model") == model and r.get("jit") == jit
                  and r["status"] == "ok"]
            if not ok:
                continue
            label = f"{model}{' + XLA' if jit else ''}"
            xs = [r["length"] for r in ok]
            axes[0].plot(xs, [r["tokens_per_s"] for r in ok], "o-", label=label)
            axes[1].plot(xs, [r["peak_rss_mb"] for r in ok], "o-", label=label)
    for ax, title in zip(axes, ("tokens / s (training step)", "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("2-layer model, d 256, 4x64 heads, FFN 1024, batch 1, Adam")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs="+")
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 4096, 16384, 65536, 131072])
    parser.add_argument("--models", nargs="+", default=["reformer", "mha"])
    parser.add_argument("--jit", nargs="+", default=["off", "on"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mha-max-length", type=int, default=8192,
                        help="longer MHA points would need > 20 GB and are not run")
    parser.add_argument("--csv", default="train_step.csv")
    args = parser.parse_args()
    if args.point:
        if args.point[0] == "matmul":
            return matmul_point()
        model, length, jit, steps = args.point
        return point(model, int(length), jit == "on", int(steps))

    rate = _common.run_point(__file__, ["matmul"])
    _common.progress(f"matmul: {rate}")
    gflops = rate.get("matmul_gflops")
    rows = []
    for length in args.lengths:
        for model in args.models:
            for jit in args.jit:
                row = {"model": model, "length": length, "jit": jit == "on"}
                if model == "mha" and length > args.mha_max_length:
                    row["status"] = "not run: O(L^2) attention does not fit"
                else:
                    row.update(_common.run_point(
                        __file__, [model, length, jit, args.steps], timeout=3600))
                if row.get("status") == "ok" and gflops:
                    row["matmul_gflops"] = gflops
                    row["mfu"] = round(
                        row["flops_per_token"] * row["tokens_per_s"] / (gflops * 1e9), 3)
                rows.append(row)
                _common.progress(f"{row}")
    path = _common.write_csv(args.csv, rows)
    plot(rows, os.path.join(_common.DOCS, "train_step_benchmark.png"))
    print(f"wrote {path}; matmul rate {gflops} GFLOP/s")
    print("| model | length | XLA | tokens/s | MFU | peak RSS MiB | status |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['length']} | {r['jit']} | {r.get('tokens_per_s', '')} "
              f"| {r.get('mfu', '')} | {r.get('peak_rss_mb', '')} | {r['status']} |")


if __name__ == "__main__":
    main()
