"""Peak memory of ChunkedFeedForward, chunked vs unchunked, forward + backward.

Setup: intermediate_dim 16384, length 8K, batch 1, d_model 256,
gelu, in `tf.function` without XLA (`graph`) and with `jit_compile=True`
(`xla`).
"Unchunked" is the same layer with `chunk_size=None`: the plain
Dense -> gelu -> Dense with ordinary autodiff. A step is the forward pass and
the gradients of a sum-of-squares loss for the input and every weight.

Each point runs in a fresh process. Reported: the process's peak RSS, that
minus the `idle` process (imports and the input only), and TensorFlow's CPU
allocator peak over a warmed-up step above what it held before the step
(tensors only).

    python benchmarks/ffn_memory.py                  # chunk sizes None, 1024, 256, 64
    python benchmarks/ffn_memory.py --quick          # None and 256, graph mode
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LENGTH, D_MODEL, FFN_DIM = 8192, 256, 16384


MODES = ("graph", "xla")


def point(chunk, mode, repeats):
    jit = mode == "xla"
    import keras
    import tensorflow as tf

    import keras_reformer as kr

    keras.utils.set_random_seed(0)
    x = tf.random.normal((1, LENGTH, D_MODEL))
    if chunk == "idle":
        _common.emit({"chunk": "idle", "mode": "-",
                      "peak_rss_mb": round(_common.peak_rss_mb())})
        return
    chunk_size = None if chunk == "None" else int(chunk)
    ffn = kr.layers.ChunkedFeedForward(FFN_DIM, chunk_size=chunk_size, seed=0)
    ffn(x[:, :8])
    weights = ffn.trainable_variables

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(ffn(x, training=True)))
        grads = tape.gradient(loss, [x] + weights)
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

    start = time.perf_counter()
    step(x)[0].numpy()
    first = time.perf_counter() - start
    times, tf_step = [], []
    for _ in range(max(repeats, 1)):
        tf.config.experimental.reset_memory_stats("CPU:0")
        held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        start = time.perf_counter()
        step(x)[0].numpy()
        times.append(time.perf_counter() - start)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        tf_step.append((peak - held) / 2**20)
    _common.emit({
        "chunk": chunk, "mode": mode,
        "peak_rss_mb": round(_common.peak_rss_mb()),
        "tf_step_peak_mb": round(statistics.median(tf_step)),
        "first_step_s": round(first, 2),
        "step_s": round(statistics.median(times), 2),
    })


def plot(rows, idle, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels, width = [], 0.38
    ok = [r for r in rows if r["chunk"] != "idle" and r["status"] == "ok"]
    chunks = []
    for r in ok:
        if r["chunk"] not in chunks:
            chunks.append(r["chunk"])
    for k, mode in enumerate(MODES):
        values = []
        for chunk in chunks:
            match = [r for r in ok if r["chunk"] == chunk and r["mode"] == mode]
            values.append(match[0]["peak_rss_mb"] - idle if match else 0)
        ax.bar([i + (k - 0.5) * width for i in range(len(chunks))], values, width,
               label=mode)
    labels = ["unchunked" if c == "None" else f"chunk {c}" for c in chunks]
    ax.set_xticks(range(len(chunks)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("peak RSS minus idle process (MiB)")
    ax.set_title(f"FFN fwd+bwd, length {LENGTH}, d_model {D_MODEL}, d_ff {FFN_DIM}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs=3, metavar=("CHUNK", "MODE", "REPEATS"))
    parser.add_argument("--chunks", nargs="+", default=["None", "1024", "256", "64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--csv", default="ffn_memory.csv")
    args = parser.parse_args()
    if args.point:
        chunk, mode, repeats = args.point
        return point(chunk, mode, int(repeats))
    if args.quick:
        args.chunks, args.modes = ["None", "256"], ["graph"]

    idle = _common.run_point(__file__, ["idle", "graph", 0])
    _common.progress(f"idle: {idle}")
    rows = [{"chunk": "idle", "mode": "-", **idle}]
    for mode in args.modes:
        for chunk in args.chunks:
            record = _common.run_point(__file__, [chunk, mode, args.repeats])
            rows.append({"chunk": chunk, "mode": mode, **record})
            _common.progress(f"chunk={chunk} mode={mode}: {record}")
    idle_mb = idle.get("peak_rss_mb", 0)
    for row in rows:
        if row.get("status") == "ok" and row["chunk"] != "idle":
            row["net_mb"] = row["peak_rss_mb"] - idle_mb
    path = _common.write_csv(args.csv, rows)
    plot(rows, idle_mb, os.path.join(_common.DOCS, "ffn_memory.png"))
    print(f"wrote {path}; idle process peak RSS {idle_mb} MiB")
    print("| chunk_size | mode | peak RSS MiB | net of idle | TF allocator step peak "
          "MiB | step s |")
    print("|---|---|---|---|---|---|")
    by = {(r["chunk"], r["mode"]): r for r in rows}
    for mode in args.modes:
        for chunk in args.chunks:
            r = by[(chunk, mode)]
            if r["status"] != "ok":
                print(f"| {chunk} | {mode} | {r['status']} |")
                continue
            print(f"| {chunk} | {mode} | {r['peak_rss_mb']} | {r['net_mb']} | "
                  f"{r['tf_step_peak_mb']} | {r['step_s']} |")
    for mode in args.modes:
        base = by.get(("None", mode))
        if base and base["status"] == "ok":
            for chunk in args.chunks:
                r = by[(chunk, mode)]
                if chunk != "None" and r["status"] == "ok":
                    print(f"{mode} chunk {chunk}: unchunked/chunked = "
                          f"{base['net_mb'] / r['net_mb']:.1f}x net of idle, "
                          f"{base['peak_rss_mb'] / r['peak_rss_mb']:.1f}x raw, "
                          f"{base['tf_step_peak_mb'] / r['tf_step_peak_mb']:.1f}x "
                          "TF allocator step peak")


if __name__ == "__main__":
    main()
