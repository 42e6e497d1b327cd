"""Forward+backward time and peak memory: LSHAttention vs MultiHeadAttention.

Setup: 4 heads x 64 (d_model 256), batch 1, causal, graph mode
(`tf.function`, no XLA), LSH with bucket 64 and 2 hashes. Each point runs in
a fresh process; memory is the process's peak RSS and, as `step_mem_mb`, that
peak minus the RSS just before the first step (the TF runtime and weights).
MultiHeadAttention points whose attention matrices alone would exceed
`--mha-limit-gb` are not run: on a 24 GB machine they cannot be.

    python benchmarks/attention.py            # 1K..64K, CSV + plot
    python benchmarks/attention.py --lengths 1024 8192 --repeats 2
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HEADS, KEY_DIM, D_MODEL = 4, 64, 256


def mha_estimate_gb(length):
    # fp32 scores, softmax, and their two gradients, each heads * L^2.
    return 4 * HEADS * length * length * 4 / 1e9


def point(kind, length, repeats):
    import keras
    import tensorflow as tf

    import keras_reformer as kr

    keras.utils.set_random_seed(0)
    if kind == "lsh":
        layer = kr.layers.LSHAttention(
            HEADS, KEY_DIM, bucket_size=64, num_hashes=2, seed=0
        )
    else:
        layer = keras.layers.MultiHeadAttention(HEADS, KEY_DIM)
    x = tf.random.normal((1, length, D_MODEL))
    layer(x[:, :128], x[:, :128]) if kind == "mha" else layer(x[:, :128])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            if kind == "mha":
                out = layer(x, x, use_causal_mask=True, training=True)
            else:
                out = layer(x, use_causal_mask=True, training=True)
            loss = tf.reduce_sum(tf.square(out))
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        return loss, grads

    base = _common.current_rss_mb()
    step(x)[0].numpy()  # trace + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss, grads = step(x)
        loss.numpy()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # best of N: robust to other load on the machine
    peak = _common.peak_rss_mb()
    _common.emit({
        "kind": kind, "length": length, "seconds": round(seconds, 4),
        "us_per_token": round(1e6 * seconds / length, 2),
        "peak_rss_mb": round(peak), "step_mem_mb": round(peak - base),
    })


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, label in (("lsh", "LSHAttention"), ("mha", "MultiHeadAttention")):
        ok = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
        xs = [r["length"] for r in ok]
        axes[0].plot(xs, [r["seconds"] for r in ok], "o-", label=label)
        axes[1].plot(xs, [r["peak_rss_mb"] for r in ok], "o-", label=label)
    _common.finish_length_figure(
        fig, axes, ("fwd+bwd seconds", "peak RSS (MiB)"),
        "Attention layer, 4 heads x 64, batch 1, causal, graph mode", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs=3, metavar=("KIND", "LENGTH", "REPEATS"))
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mha-limit-gb", type=float, default=12.0)
    parser.add_argument("--csv", default="attention.csv")
    args = parser.parse_args()
    if args.point:
        kind, length, repeats = args.point
        return point(kind, int(length), int(repeats))

    rows = []
    for length in args.lengths:
        for kind in ("lsh", "mha"):
            if kind == "mha" and mha_estimate_gb(length) > args.mha_limit_gb:
                rows.append({"kind": kind, "length": length, "status":
                             f"not run: attention matrices alone need "
                             f"~{mha_estimate_gb(length):.0f} GB"})
            else:
                rows.append({"kind": kind, "length": length,
                             **_common.run_point(__file__, [kind, length, args.repeats])})
            _common.progress(f"{kind} {length}: {rows[-1]}")
    path = _common.write_csv(args.csv, rows)
    plot(rows, os.path.join(_common.DOCS, "attention_benchmark.png"))
    print(f"wrote {path}")
    by = {(r["kind"], r["length"]): r for r in rows}
    print("| length | LSH s | MHA s | speed-up | LSH peak MiB | MHA peak MiB | "
          "LSH step MiB | MHA step MiB | mem ratio (step) | LSH us/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        lsh, mha = by[("lsh", length)], by[("mha", length)]
        if lsh["status"] != "ok":
            print(f"| {length} | {lsh['status']} |")
            continue
        if mha["status"] == "ok":
            speed = f"{mha['seconds'] / lsh['seconds']:.1f}x"
            mem = f"{mha['step_mem_mb'] / max(lsh['step_mem_mb'], 1):.1f}x"
            cells = [mha["seconds"], speed, mha["peak_rss_mb"], mha["step_mem_mb"], mem]
        else:
            cells = [mha["status"], "", "", "", ""]
        print(f"| {length} | {lsh['seconds']} | {cells[0]} | {cells[1]} | "
              f"{lsh['peak_rss_mb']} | {cells[2]} | {lsh['step_mem_mb']} | "
              f"{cells[3]} | {cells[4]} | {lsh['us_per_token']} |")


if __name__ == "__main__":
    main()
