"""Where a training step's time goes: TensorFlow's profiler, ops by category.

The reference model of benchmarks/train_step.py (causal ReformerCausalLM, 2
layers, d_model 256, 4 heads x 64, FFN 1024, bucket 64, 2 hashes, batch 1,
Adam) at `--length` (default 16K), graph mode unless `--jit`. After two
warm-up steps, `--steps` steps run under `tf.profiler.experimental`; the
profiler's table of TensorFlow ops (self time) is summed by category, from each op's
name scope (the layers' and the ops' `tf.name_scope`s, which the backward
pass and the recomputation keep) and its type:

- hashing: `lsh_hash` (random rotations, argmax);
- sort / gather / unsort: `lsh_sort`, `lsh_gather`, `lsh_unsort` and their
  gradients;
- chunk attention: `chunk_attention` (look-around, logits, bias, softmax,
  weighted sum) and the round combination (`lsh_combine`), forward,
  recomputation and backward;
- FFN: `chunked_map` (ChunkedFeedForward's slices, forward and backward);
- layer norms: the `*norm*` layers;
- attention projections: the rest of the attention layer (qk, value,
  output);
- optimizer: the Adam update (`adam`, `Assign*`, `ResourceApply*`);
- embedding, head and loss: the rest of the model;
- framework: control flow and everything the profiler shows without a
  category (executor overhead is the wall time no op accounts for).

With `--jit` the step is one XLA program, which TensorFlow's op table sees
as a single op. XLA:CPU can mark each of its own kernels (a fusion, a
matmul, a sort) in the profiler's trace
(`--xla_cpu_enable_xprof_traceme=true`); the script turns that on, dumps
the optimized program (`--xla_dump_to`), and files each kernel's self time
under the TensorFlow op its HLO metadata names (`op_name`, which keeps the
name scopes), in the same categories. Loops and calls (`while`,
`conditional`, `call`) count as framework.

The figures are sums of op self times over both cores' threads, so they
can exceed wall time, and miss what happens between ops (the executor's
own work: wall time minus op time on the critical path); the shares are
what count.

    python benchmarks/profile_step.py                  # 16K, graph mode
    python benchmarks/profile_step.py --ffn-chunk 128    # FFN slices of 128

Writes benchmarks/results/profile_step_<length>[_xla].csv and prints a
Markdown table.

It also splits HFU (hardware FLOPs per second / the machine's matmul
rate, measured in a fresh process as benchmarks/train_step.py measures
it) into two measured factors, exactly:

    HFU = (hardware FLOPs / matmul op seconds) / matmul rate
          x (matmul op seconds / wall seconds)

the first is how fast the matmul kernels run against the best large
matmul, the second how much of the step they fill; everything else in
the step (the categories' other ops, and what no op accounts for) is the
room between the second factor and what a target HFU needs. The wall is
the best of two steps timed before the profiler starts (the profiler
slows the steps it records). Matmul ops are those whose type contains
MatMul or Einsum (XLA: the kernels whose HLO metadata names such an op).
"""

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import train_step  # noqa: E402

# (category, name-scope fragments); the first match wins, so the specific
# LSH scopes come before the layer scopes that contain them.
SCOPES = [
    ("hashing", ("lsh_hash",)),
    ("sort / gather / unsort", ("lsh_sort", "lsh_gather", "lsh_unsort")),
    ("chunk attention + round combination", ("chunk_attention", "lsh_combine")),
    ("FFN", ("chunked_map", "chunked_feed_forward", "feed_forward")),
    ("layer norms", ("norm",)),
    # LSHAttention's own scope ("attention" inside an AttentionBlock): what
    # is left there are the qk / value / output projections.
    ("attention projections", ("lsh_attention", "attention")),
    ("optimizer", ("adam", "optimizer")),
]
OPTIMIZER_TYPES = ("ResourceApply", "AssignVariable", "AssignAdd", "AssignSub")
CONTROL_TYPES = ("While", "If", "PartitionedCall", "StatefulPartitionedCall",
                 "Identity", "NoOp", "Enter", "Exit", "Merge", "Switch",
                 "NextIteration", "LoopCond", "_Retval", "_Arg", "Const",
                 "TensorList", "ReadVariableOp", "VarHandleOp")


def categorize(name, op_type):
    lowered = name.lower()
    for category, fragments in SCOPES:
        if any(f in lowered for f in fragments):
            return category
    if op_type.startswith(OPTIMIZER_TYPES):
        return "optimizer"
    if op_type.startswith(CONTROL_TYPES):
        return "framework (control flow, variables)"
    return "embedding, head, loss, other"


def op_events(logdir):
    """(name, type, self microseconds) of every TensorFlow op the profiler
    saw on the host, from its `framework_op_stats` table (self time: a
    `While` or function-call op does not count its body's ops again)."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    data, ok = plugin.xspace_to_tools_data(
        _common.xplane_paths(logdir), "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"the profiler's op table is unavailable: {data[:200]!r}")
    if isinstance(data, bytes):
        try:
            data = gzip.decompress(data)
        except OSError:
            pass
        data = data.decode("utf-8")
    tables = json.loads(data)
    table = tables[0] if isinstance(tables, list) else tables
    columns = [c["id"] for c in table["cols"]]
    name_i, type_i = columns.index("operation"), columns.index("type")
    self_i = columns.index("total_self_time")
    where_i = columns.index("host_or_device")
    events = []
    for row in table["rows"]:
        cells = [c.get("v") if isinstance(c, dict) else c for c in row["c"]]
        if str(cells[where_i]).lower() != "host" or cells[type_i] == "IDLE":
            continue
        events.append((str(cells[name_i]), str(cells[type_i]), float(cells[self_i])))
    return events


XLA_TRACE_FLAGS = "--xla_cpu_enable_xprof_traceme=true --xla_dump_hlo_as_text"
HLO_LINE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_type="([^"]*)" '
                      r'op_name="([^"]*)"')
CONTROL_HLO = ("while", "conditional", "call")


def hlo_metadata(dump_dir):
    """{instruction name: (op_type, op_name)} of the largest optimized XLA
    module dumped (the training step; smaller ones are helpers)."""
    text = open(_common.largest_xla_dump(dump_dir, "after_optimizations.txt")).read()
    table = {}
    for line in text.splitlines():
        match = HLO_LINE.match(line)
        if match:
            table[match.group(1)] = (match.group(2), match.group(3))
    return table


def xla_kernel_events(logdir, metadata):
    """(op_name, op_type, self microseconds) of every XLA kernel in the
    trace. Self time: an event's duration minus that of the events nested
    in it on the same thread (a `while` contains its body's kernels)."""
    events = []

    def close(item):
        end, name, children, duration = item
        if name in metadata:
            op_type, op_name = metadata[name]
            if name.split(".")[0] in CONTROL_HLO:
                op_type = "While"  # counted as framework
            events.append((op_name, op_type, (duration - children) / 1e6))

    for plane in _common.read_xspace(logdir).planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            spans = sorted(
                (e.offset_ps, e.offset_ps + e.duration_ps, names.get(e.metadata_id, ""))
                for e in line.events)
            stack = []  # [end, name, child picoseconds, duration]
            for start, end, name in spans:
                while stack and stack[-1][0] <= start:
                    close(stack.pop())
                if stack:
                    stack[-1][2] += end - start
                stack.append([end, name, 0, end - start])
            while stack:
                close(stack.pop())
    if not events:
        raise RuntimeError("the trace has no XLA kernel events; was "
                           "--xla_cpu_enable_xprof_traceme set before XLA started?")
    return events


def is_matmul(op_type):
    return "MatMul" in op_type or "Einsum" in op_type


def hfu_split(record, gflops):
    """The two factors of HFU (module docstring) from a profile record."""
    length = record["length"]
    flops = train_step.hardware_flops_per_token("reformer", length) * length
    wall, matmul = record["unprofiled_wall_s"], record["matmul_op_s"]
    kernel_rate = flops / matmul / 1e9
    return {
        "hardware_gflop_per_step": round(flops / 1e9, 2),
        "hfu": round(flops / wall / 1e9 / gflops, 3),
        "matmul_kernel_gflops": round(kernel_rate, 1),
        "matmul_kernel_vs_peak": round(kernel_rate / gflops, 3),
        "matmul_busy": round(matmul / wall, 3),
    }


def point(length, jit, steps, ffn_chunk):
    dump_dir = None
    if jit:  # before TensorFlow starts XLA
        dump_dir = tempfile.mkdtemp(prefix="profile_step_hlo_")
        _common.add_xla_flags(f"{XLA_TRACE_FLAGS} --xla_dump_to={dump_dir}")
    import tensorflow as tf

    if ffn_chunk:
        train_step.CONFIG["feedforward_chunk_size"] = ffn_chunk
    net = train_step.build("reformer", length, jit)
    x, y = train_step.batch("reformer", length)
    walls = []
    for _ in range(4):  # two warm-up steps, then two timed ones
        start = time.perf_counter()
        net.train_on_batch(x, y)
        walls.append(time.perf_counter() - start)
    logdir = tempfile.mkdtemp(prefix="profile_step_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(steps):
        net.train_on_batch(x, y)
    wall = (time.perf_counter() - start) / steps
    tf.profiler.experimental.stop()
    totals = collections.Counter()
    types = collections.defaultdict(collections.Counter)
    events = (xla_kernel_events(logdir, hlo_metadata(dump_dir)) if jit
              else op_events(logdir))
    matmul = 0.0
    for name, op_type, micros in events:
        category = categorize(name, op_type)
        totals[category] += micros / 1e6 / steps
        types[category][op_type] += micros / 1e6 / steps
        if is_matmul(op_type):
            matmul += micros / 1e6 / steps
    _common.emit({
        "length": length, "jit": jit, "steps": steps, "wall_s": round(wall, 4),
        "unprofiled_wall_s": round(min(walls[2:]), 4), "matmul_op_s": round(matmul, 4),
        "op_seconds": {k: round(v, 4) for k, v in totals.items()},
        "top_types": {k: [(t, round(s, 4)) for t, s in v.most_common(4)]
                      for k, v in types.items()},
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="XLA (jit_compile=True)")
    parser.add_argument("--ffn-chunk", type=int, default=0,
                        help="feedforward_chunk_size (default: the model's)")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.check_length_and_steps(parser, args)
    if args.point:
        return point(args.length, args.jit, args.steps, args.ffn_chunk)
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--length",
           str(args.length), "--steps", str(args.steps), "--ffn-chunk",
           str(args.ffn_chunk)] + (["--jit"] if args.jit else [])
    record = _common.run_json(cmd, timeout=3600, prefix="RESULT ")
    if record.get("status") != "ok":
        sys.exit(f"profile failed: {record}")
    rate = _common.run_point(os.path.abspath(train_step.__file__), ["matmul"])
    gflops = rate.get("matmul_gflops")
    seconds = record["op_seconds"]
    total = sum(seconds.values())
    rows = [{"category": k, "op_seconds": v, "share": round(v / total, 4),
             "top_op_types": " ".join(f"{t}:{s}" for t, s in record["top_types"][k])}
            for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])]
    name = (f"profile_step_{args.length}{'_xla' if args.jit else ''}"
            f"{f'_ffn{args.ffn_chunk}' if args.ffn_chunk else ''}.csv")
    path = _common.write_csv(name, rows)
    print(f"wrote {path}")
    print(f"length {args.length}, {'XLA' if args.jit else 'graph mode'}: wall "
          f"{record['wall_s']} s per step; op time summed over threads "
          f"{total:.3f} s")
    if gflops:
        split = hfu_split(record, gflops)
        print(f"matmul rate {gflops} GFLOP/s; unprofiled wall {record['unprofiled_wall_s']} s; "
              f"hardware {split['hardware_gflop_per_step']} GFLOP per step: HFU "
              f"{split['hfu']} = matmul kernels at {split['matmul_kernel_gflops']} GFLOP/s "
              f"({split['matmul_kernel_vs_peak']} of the rate) x matmuls busy "
              f"{split['matmul_busy']} of the wall ({record['matmul_op_s']} op s)")
        _common.write_csv(os.path.splitext(name)[0] + "_hfu.csv", [dict(
            length=args.length, jit=args.jit, matmul_gflops=gflops,
            unprofiled_wall_s=record["unprofiled_wall_s"],
            matmul_op_s=record["matmul_op_s"], **split)])
    else:
        print(f"no matmul rate: {rate}")
    print("| category | op s per step | share | top op types (s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['category']} | {row['op_seconds']:.3f} | "
              f"{100 * row['share']:.1f}% | {row['top_op_types']} |")


if __name__ == "__main__":
    main()
