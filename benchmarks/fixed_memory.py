"""Where a training step's fixed memory goes: RSS stage by stage.

For the reference model of benchmarks/train_step.py (graph mode, batch 1)
at `--length`, in this one process: RSS (from /proc/self/status) after the
imports, after building the model, after the first training step (tracing
and running it) and after five more steps; the process's peak RSS;
TensorFlow's CPU allocator peak (the tensors); and tokens/s (best of the
last three steps). Run one process per setting: TensorFlow reads its
environment at import time.

    python benchmarks/fixed_memory.py --length 1024
    python benchmarks/fixed_memory.py --length 1024 --grappler off
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/fixed_memory.py --length 1024
    MALLOC_ARENA_MAX=2 python benchmarks/fixed_memory.py --length 1024
    python benchmarks/fixed_memory.py --length 1024 --python-heap

`--python-heap` also measures the Python heap that the first step adds
(`tracemalloc`, which slows tracing down: leave it off for tokens/s).
Prints one JSON record.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return round(int(line.split()[1]) / 1024)
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--grappler", choices=["on", "off"], default="on",
                        help="off: tf.config.optimizer's disable_meta_optimizer")
    parser.add_argument("--python-heap", action="store_true")
    args = parser.parse_args()
    args.steps = 1
    _common.check_length_and_steps(parser, args)

    import tensorflow as tf

    import train_step

    record = {"length": args.length, "grappler": args.grappler,
              "env": {k: os.environ[k] for k in ("TF_ENABLE_ONEDNN_OPTS",
                                                 "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                 "MALLOC_ARENA_MAX") if k in os.environ},
              "rss_import_mb": rss_mb()}
    if args.grappler == "off":
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    net = train_step.build("reformer", args.length, False)
    record["rss_build_mb"] = rss_mb()
    x, y = train_step.batch("reformer", args.length)
    if args.python_heap:
        import tracemalloc

        tracemalloc.start()
    net.train_on_batch(x, y)
    if args.python_heap:
        record["python_heap_first_step_mb"] = round(
            tracemalloc.get_traced_memory()[0] / 2**20)
        tracemalloc.stop()
    record["rss_first_step_mb"] = rss_mb()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        net.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    record["rss_end_mb"] = rss_mb()
    record["peak_rss_mb"] = round(_common.peak_rss_mb())
    try:
        record["allocator_peak_mb"] = round(
            tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20)
    except ValueError:  # no allocator statistics (e.g. TF_ENABLE_ONEDNN_OPTS=0)
        record["allocator_peak_mb"] = None
    record["tokens_per_s"] = round(args.length / min(times[2:]))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
