"""Peak memory of a training step vs depth: ReversibleSequence vs plain autodiff.

Setup: length 16K, batch 1, d_model 256, f = LayerNorm ->
causal LSHAttention (4 heads x 64, bucket 64, 2 hashes), g = LayerNorm ->
ChunkedFeedForward(1024, dropout 0.1, chunk 512); 1, 2, 4, 8, 12 blocks;
three kinds: `reversible` (the default: identical blocks run as one loop
body over stacked weights, `loop_blocks="auto"`), `unrolled`
(`loop_blocks=False`, a copy of the program per block) and `plain`
(`reversible=False`, ordinary autodiff). A step is forward + gradients of
every weight (and the input) of a sum-of-squares loss on concat(y1, y2), in
one of three modes:

- `graph`: `tf.function` without XLA;
- `xla`: `tf.function(jit_compile=True)`;
- `xla_memsched`: the same with
  `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`, XLA's
  CPU scheduler that orders for memory instead of concurrency;
- `xla_lowmem`: XLA with `XLA_FLAGS=--xla_cpu_use_fusion_emitters=false`,
  XLA:CPU's older code generator for fusions, which compiles in less memory.

Each point runs in a fresh process (peak RSS = `ru_maxrss`). The `idle`
point imports TensorFlow, Keras and the package and creates the input, and
nothing else: its peak RSS is the baseline subtracted for `net_mb`. The
depth ratio is formed from `net_mb` (peak minus idle) and also given raw.

    python benchmarks/depth_memory.py            # all points; CSV + docs/<csv name>.png
    python benchmarks/depth_memory.py --quick    # 1, 4, 12 blocks, graph mode
    python benchmarks/depth_memory.py --modes graph xla --depths 1 12
    python benchmarks/depth_memory.py --length 1024 --kinds reversible --modes graph xla \
        --depths 1 8 --csv depth_memory_1k.csv      # fixed per-block cost
    python benchmarks/depth_memory.py --jit --kinds reversible unrolled --depths 1 8 \
        --short-length 2048 --csv depth_memory_xla.csv   # length-dependent part
    python benchmarks/depth_memory.py --length 1024 --kinds reversible stacked \
        --modes xla graph --depths 2 8 16 --adam --csv depth_memory_1k_adam.csv
                                          # per-block cost with Adam's update

Kind `reversible` keeps each block's weights (`stack_weights=False`);
`stacked` is the same with `stack_weights=True` (one (depth, ...) variable
per kind of block weight); `sequential` is your own blocks the documented
way, `keras.Sequential([LayerNormalization(), LSHAttention(...)])` and
`keras.Sequential([LayerNormalization(), ChunkedFeedForward(...)])`
(not causal), under ReversibleSequence's defaults (`stack_weights="auto"`
stacks them). `--adam` adds an Adam update of every
weight to the step, as `model.fit` would run it.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODES = ("graph", "xla", "xla_memsched", "xla_lowmem")
KINDS = ("reversible", "stacked", "sequential", "unrolled", "plain")
MODE_FLAGS = {
    "xla_memsched": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "xla_lowmem": "--xla_cpu_use_fusion_emitters=false",
}
LENGTH, D_MODEL, HEADS, KEY_DIM = 16384, 256, 4, 64
BUCKET, HASHES, FFN_DIM, FFN_CHUNK = 64, 2, 1024, 512


def build_stack(depth, reversible, loop_blocks="auto", stack_weights=False,
                sequential=False):
    import keras

    import keras_reformer as kr

    if sequential:  # the documented way to bring your own blocks
        def half(layer):
            return keras.Sequential([keras.layers.LayerNormalization(), layer])

        blocks = [
            (half(kr.layers.LSHAttention(HEADS, KEY_DIM, bucket_size=BUCKET,
                                         num_hashes=HASHES, seed=2 * i)),
             half(kr.layers.ChunkedFeedForward(FFN_DIM, dropout=0.1,
                                               chunk_size=FFN_CHUNK, seed=2 * i + 1)))
            for i in range(depth)
        ]
        return kr.layers.ReversibleSequence(blocks)

    class Attention(keras.layers.Layer):
        def __init__(self, seed, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True
            self.norm = keras.layers.LayerNormalization()
            self.attention = kr.layers.LSHAttention(
                HEADS, KEY_DIM, bucket_size=BUCKET, num_hashes=HASHES, seed=seed
            )

        def call(self, x, mask=None, training=None):
            return self.attention(self.norm(x), query_mask=mask,
                                  training=training, use_causal_mask=True)

    class FeedForward(keras.layers.Layer):
        def __init__(self, seed, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.LayerNormalization()
            self.ffn = kr.layers.ChunkedFeedForward(
                FFN_DIM, dropout=0.1, chunk_size=FFN_CHUNK, seed=seed
            )

        def call(self, x, training=None):
            return self.ffn(self.norm(x), training=training)

    blocks = [(Attention(2 * i), FeedForward(2 * i + 1)) for i in range(depth)]
    return kr.layers.ReversibleSequence(blocks, reversible=reversible,
                                        loop_blocks=loop_blocks,
                                        stack_weights=stack_weights)


def make_step(stack, jit, optimizer=None):
    """The benchmark's step of a built `stack`, a `tf.function` (XLA if
    `jit`) of the input: forward, gradients of a sum-of-squares loss on
    concat(y1, y2) with respect to the input and every weight, and
    `optimizer`'s update if one is given. Returns (loss, a sum of gradients)."""
    import tensorflow as tf

    weights = stack.trainable_variables

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y1, y2 = stack([x, x], training=True)
            loss = tf.reduce_sum(tf.square(y1)) + tf.reduce_sum(tf.square(y2))
        grads = tape.gradient(loss, [x] + weights)
        if optimizer is not None:
            optimizer.apply(grads[1:], weights)
            return loss, tf.reduce_sum(grads[0])
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

    return step


def point(kind, depth, mode, repeats, length=LENGTH, adam=False):
    if mode in MODE_FLAGS:  # before TensorFlow starts XLA
        _common.add_xla_flags(MODE_FLAGS[mode])
    jit = mode != "graph"
    import keras
    import tensorflow as tf

    import keras_reformer  # noqa: F401  (the idle baseline imports it too)

    keras.utils.set_random_seed(0)
    x = tf.random.normal((1, length, D_MODEL))
    if kind == "idle":
        _common.emit({"kind": "idle", "depth": 0, "mode": "-",
                      "peak_rss_mb": round(_common.peak_rss_mb())})
        return
    # "reversible" runs identical blocks as one loop body over each block's
    # own weights (loop_blocks="auto", stack_weights=False); "unrolled" is
    # the same stack with a copy of the program per block
    # (loop_blocks=False); "stacked" loops over weights the stack holds
    # stacked itself (stack_weights=True); "sequential" is keras.Sequential
    # blocks with ReversibleSequence's defaults (stacked by "auto").
    stack = build_stack(depth, reversible=(kind != "plain"),
                        loop_blocks=False if kind == "unrolled" else "auto",
                        stack_weights=kind == "stacked",
                        sequential=kind == "sequential")
    # Built as a functional model builds it (symbolically), not by an eager
    # call, whose kernels and caches are not what a model.fit user pays.
    stack.build([tuple(x.shape)] * 2)
    weights = stack.trainable_variables

    # --adam: the step also applies Adam's update, one kernel set per
    # variable, as model.fit would (stacked weights have one per slot).
    optimizer = keras.optimizers.Adam(1e-4) if adam else None
    if optimizer is not None:
        optimizer.build(weights)

    step = make_step(stack, jit, optimizer)
    before = _common.current_rss_mb()
    start = time.perf_counter()
    step(x)[0].numpy()  # trace, compile, run
    first = time.perf_counter() - start
    # Held after the first step, against the peak: what the trace/compile
    # only passed through (RSS that freed memory left) vs what it keeps.
    after_first = _common.current_rss_mb()
    # What of that is memory freed (e.g. by XLA's compiler) that glibc keeps:
    # malloc_trim hands free heap pages back to the OS. Peak RSS is already
    # recorded; the measured steps below run after it.
    after_trim = None
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        after_trim = round(_common.current_rss_mb())
    except (OSError, AttributeError):  # not glibc
        pass
    # TensorFlow's CPU allocator counts tensors only (not graphs, kernels or
    # compiler memory): its peak over a warmed-up step above what it held
    # before the step is the step's working memory. (RSS cannot show that
    # for a second step: freed memory stays in the allocator's pool.) XLA's
    # temp arena is one allocation that it counts whole, apparently rounded
    # up to a power of two.
    tf_step, times = [], []
    for _ in range(max(repeats, 1)):
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            held = tf.config.experimental.get_memory_info("CPU:0")["current"]
        except (ValueError, RuntimeError):
            held = None
        start = time.perf_counter()
        step(x)[0].numpy()
        times.append(time.perf_counter() - start)
        if held is not None:
            peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
            tf_step.append((peak - held) / 2**20)
    _common.emit({
        "kind": kind, "depth": depth, "mode": mode, "adam": int(adam),
        "peak_rss_mb": round(_common.peak_rss_mb()),
        "rss_before_first_step_mb": round(before),
        "rss_after_first_step_mb": round(after_first),
        "rss_after_trim_mb": after_trim,
        "tf_step_peak_mb": round(statistics.median(tf_step)) if tf_step else None,
        "tf_step_peak_max_mb": round(max(tf_step)) if tf_step else None,
        "first_step_s": round(first, 2),
        "step_s": round(statistics.median(times), 2),
    })


LABELS = {"reversible": "reversible (looped blocks)",
          "sequential": "keras.Sequential blocks, defaults",
          "stacked": "reversible, stacked weights (stack_weights=True)",
          "unrolled": "reversible, unrolled (loop_blocks=False)",
          "plain": "reversible=False"}


def plot(rows, idle, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"graph": "C0", "xla": "C1", "xla_memsched": "C2", "xla_lowmem": "C3"}
    styles = {"reversible": "o-", "stacked": "o-.", "sequential": "s-.",
              "unrolled": "o:", "plain": "o--"}
    for kind in KINDS:
        for mode in MODES:
            ok = [r for r in rows if r["kind"] == kind and r["mode"] == mode
                  and r["status"] == "ok"]
            if not ok:
                continue
            label = f"{LABELS[kind]}, {mode}"
            depths = [r["depth"] for r in ok]
            axes[0].plot(depths, [r["peak_rss_mb"] - idle for r in ok],
                         styles[kind], color=colors[mode], label=label)
            axes[1].plot(depths, [r["tf_step_peak_mb"] for r in ok],
                         styles[kind], color=colors[mode], label=label)
    for ax, title in zip(axes, ("peak RSS minus idle process (MiB)",
                                "TF allocator peak of a warmed-up step (MiB)")):
        ax.set_xlabel("blocks (f, g pairs)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Training step, length {rows[-1].get('length', LENGTH)}, "
                 f"d_model {D_MODEL}, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def replot(name):
    import csv

    with open(os.path.join(_common.RESULTS, name), newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("depth", "peak_rss_mb", "tf_step_peak_mb", "length"):
            if row.get(key) not in (None, ""):
                row[key] = int(float(row[key]))
    idle = next(r["peak_rss_mb"] for r in rows if r["kind"] == "idle")
    path = os.path.join(_common.DOCS, os.path.splitext(name)[0] + ".png")
    plot([r for r in rows if r["kind"] != "idle"], idle, path)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--adam", action="store_true",
                        help="the step also applies an Adam update to every weight")
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument("--kinds", nargs="+", choices=KINDS,
                        default=["reversible", "plain"])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3,
                        help="warmed-up steps measured after the first (>= 1)")
    parser.add_argument("--quick", action="store_true",
                        help="depths 1, 4, 12 in graph mode only")
    parser.add_argument("--jit", action="store_true",
                        help="XLA only (the same as --modes xla)")
    parser.add_argument("--short-length", type=int, default=None,
                        help="also run each point at this length and report the "
                        "length-dependent part: peak RSS at --length minus at this")
    parser.add_argument("--csv", default="depth_memory.csv")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw docs/<--csv name>.png from that CSV")
    args = parser.parse_args()
    if args.replot:
        return replot(args.csv)
    if args.jit:
        args.modes = ["xla"]
    if args.point:
        kind, depth, mode, repeats, length, *adam = args.point
        return point(kind, int(depth), mode, int(repeats), int(length),
                     adam=bool(int(adam[0])) if adam else False)
    if args.quick:
        args.depths, args.modes = [1, 4, 12], ["graph"]

    idle = _common.run_point(__file__, ["idle", 0, "graph", 0, args.length])
    _common.progress(f"idle: {idle}")
    rows = [{"kind": "idle", "depth": 0, "mode": "-", **idle}]
    for mode in args.modes:
        for kind in args.kinds:
            for depth in args.depths:
                record = _common.run_point(
                    __file__, [kind, depth, mode, args.repeats, args.length,
                               int(args.adam)])
                if args.short_length and record.get("status") == "ok":
                    short = _common.run_point(
                        __file__, [kind, depth, mode, args.repeats, args.short_length,
                                   int(args.adam)])
                    if short.get("status") == "ok":
                        record["short_peak_rss_mb"] = short["peak_rss_mb"]
                        record["length_part_mb"] = (record["peak_rss_mb"]
                                                    - short["peak_rss_mb"])
                rows.append({"kind": kind, "depth": depth, "mode": mode,
                             "length": args.length, **record})
                _common.progress(f"{kind} depth={depth} mode={mode}: {record}")
    idle_mb = idle.get("peak_rss_mb", 0)
    for row in rows:
        if row.get("status") == "ok" and row["kind"] != "idle":
            row["net_mb"] = row["peak_rss_mb"] - idle_mb
    path = _common.write_csv(args.csv, rows)
    if any(r.get("status") == "ok" for r in rows[1:]):  # a figure per run
        plot(rows, idle_mb, os.path.join(
            _common.DOCS, os.path.splitext(os.path.basename(args.csv))[0] + ".png"))
    print(f"wrote {path}; idle process peak RSS {idle_mb} MiB")
    print("Peak RSS of the process (MiB), the same minus the idle process, "
          "TF allocator peak of a warmed-up step above what it held before "
          "(median over the measured steps), first step (trace + compile) and "
          "a warmed-up step in seconds.")
    print("| mode | kind | blocks | peak RSS | net of idle | TF alloc step "
          "| first step s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["kind"], r["depth"], r["mode"]): r for r in rows}
    for mode in args.modes:
        for kind in args.kinds:
            for depth in args.depths:
                r = by.get((kind, depth, mode), {"status": "not run"})
                cells = ([r.get(k) for k in ("peak_rss_mb", "net_mb",
                                             "tf_step_peak_mb", "first_step_s",
                                             "step_s")]
                         if r["status"] == "ok" else [r["status"], "", "", "", ""])
                print("| " + " | ".join(str(c) for c in [mode, kind, depth] + cells)
                      + " |")
    for mode in args.modes:
        for kind in args.kinds:
            lo = by[(kind, min(args.depths), mode)]
            hi = by[(kind, max(args.depths), mode)]
            if lo["status"] == hi["status"] == "ok":
                ratios = ", ".join(
                    f"{name} {hi[k] / lo[k]:.2f}"
                    for name, k in (("net of idle", "net_mb"),
                                    ("raw", "peak_rss_mb"),
                                    ("TF allocator step", "tf_step_peak_mb"))
                    if hi.get(k) and lo.get(k))
                print(f"{kind} {mode}: peak({max(args.depths)})/peak"
                      f"({min(args.depths)}): {ratios}")
                if hi.get("length_part_mb") and lo.get("length_part_mb"):
                    print(f"{kind} {mode}: length-dependent part (peak at "
                          f"{args.length} minus at {args.short_length}): "
                          f"{lo['length_part_mb']} MiB at {min(args.depths)} "
                          f"blocks, {hi['length_part_mb']} at {max(args.depths)}: "
                          f"{hi['length_part_mb'] / lo['length_part_mb']:.2f}x")
            # Per block between looped depths: one block runs unrolled (there
            # is nothing to loop), so the 1 -> N slope mixes in a one-time cost.
            looped = sorted(d for d in args.depths if d >= 2
                            and by[(kind, d, mode)]["status"] == "ok")
            if len(looped) >= 2:
                a, b = by[(kind, looped[0], mode)], by[(kind, looped[-1], mode)]
                slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (looped[-1] - looped[0])
                print(f"{kind} {mode}: peak RSS per block, {looped[0]} -> "
                      f"{looped[-1]} blocks: {slope:.1f} MiB")


if __name__ == "__main__":
    main()
