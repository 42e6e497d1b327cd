"""What is alive at the peak of a training step: TensorFlow's own tensors.

Peak RSS mixes tensors with the runtime (~580 MiB for TensorFlow + Keras
before any model exists) and the allocator's free-but-kept pages. This
script looks at the tensors alone, for the reference model of
benchmarks/train_step.py (graph mode, batch 1) at `--length`:

- the CPU allocator's peak (`tf.config.experimental.get_memory_info`) of
  each of `--steps` steps after two warm-ups, and the process's peak RSS;
  the step runs on TensorFlow's BFC CPU allocator
  (`TF_CPU_ALLOCATOR_USE_BFC=true`, set here unless set already), which
  always keeps these statistics and reports its allocations to the
  profiler (TensorFlow's default CPU allocator does so only where
  something has turned its statistics on);
- the tensors alive at the peak of one profiled step, from the profiler's
  allocation and deallocation events, largest first, with the op that
  allocated each buffer (a buffer that an op reuses for its output keeps
  the name of the op that allocated it).

    python benchmarks/memory_profile.py --length 65536
    python benchmarks/memory_profile.py --length 131072 --jit

With `--jit` the step is one XLA program, whose buffers XLA plans before
it runs: the script dumps the program's buffer assignment
(`--xla_dump_to`) and lists the buffers live at its planned peak, from
XLA's own "peak usage" breakdown (a buffer inside a loop is named by the
op that defines it in the loop's body).

Writes benchmarks/results/memory_profile_<length>[_xla].csv (the live
tensors or buffers) and prints the peaks and the largest of them.
"""

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import train_step  # noqa: E402

ALLOCATION, DEALLOCATION = "MemoryAllocation", "MemoryDeallocation"
LOOP_FRAME = re.compile(r"while(_\d+)?|body|_\d+")


def allocation_events(logdir):
    """(time ps, kind, stats dict) of the profiler's allocator events."""
    space = _common.read_xspace(logdir)
    events = []
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                kind = names.get(event.metadata_id, "")
                if kind not in (ALLOCATION, DEALLOCATION):
                    continue
                stats = {}
                for stat in event.stats:
                    value = (stat.str_value or stat.int64_value or stat.uint64_value
                             or stat.double_value)
                    if stat.ref_value:
                        value = stat_names.get(stat.ref_value, value)
                    stats[stat_names.get(stat.metadata_id, "")] = value
                events.append((line.timestamp_ns * 1000 + event.offset_ps, kind, stats))
    return sorted(events, key=lambda e: e[0])


def live_at_peak(events):
    """(peak bytes, [(bytes, op, shape, dtype)] alive at that moment)."""
    live, current, peak, at_peak = {}, 0, 0, {}
    for _, kind, stats in events:
        address = stats.get("addr")
        if kind == ALLOCATION:
            size = int(stats.get("allocation_bytes", 0) or 0)
            live[address] = (size, str(stats.get("tf_op", "?")),
                             str(stats.get("shape", "?")), str(stats.get("data_type", "?")))
            current += size
        elif address in live:
            current -= live.pop(address)[0]
        if current > peak:
            peak, at_peak = current, dict(live)
    return peak, sorted(at_peak.values(), key=lambda r: -r[0])


def short_scope(op, keep=70):
    """The op's name without the loop frames (`while`, `body`, `_123`)
    that nest it, its last `keep` characters: what a table can show."""
    parts = [p for p in op.split("/") if not LOOP_FRAME.fullmatch(p)]
    return "/".join(parts)[-keep:]


def point(length, steps):
    import tensorflow as tf

    net = train_step.build("reformer", length, False)
    x, y = train_step.batch("reformer", length)
    for _ in range(2):
        net.train_on_batch(x, y)
    peaks = []
    for _ in range(steps):
        tf.config.experimental.reset_memory_stats("CPU:0")
        net.train_on_batch(x, y)
        peaks.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20)
    logdir = tempfile.mkdtemp(prefix="memory_profile_")
    tf.profiler.experimental.start(logdir)
    net.train_on_batch(x, y)
    tf.profiler.experimental.stop()
    peak, tensors = live_at_peak(allocation_events(logdir))
    _common.emit({
        "length": length,
        "allocator_peak_mib": [round(p) for p in peaks],
        "peak_rss_mib": round(_common.peak_rss_mb()),
        "traced_peak_mib": round(peak / 2**20),
        "tensors": [[round(b / 2**20, 1), op, shape, dtype] for b, op, shape, dtype in tensors],
    })


PEAK_HEADING = "Stack trace breakdown for peak usage:"
PEAK_ENTRY = re.compile(r"^[\s│├└─]*(\S+) \([\d.]+%, total: ([\d ]+) bytes, "
                        r"current: ([\d ]+) bytes")


def xla_peak_buffers(dump_dir):
    """(planned peak bytes, [(bytes, name)] live at the peak, largest
    first) of the largest XLA module dumped (the training step)."""
    path = _common.largest_xla_dump(dump_dir, "buffer-assignment.txt")
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if PEAK_HEADING in line)
    peak = int(lines[start].split(":")[1].replace(" ", "").split("bytes")[0])
    buffers = []
    for line in lines[start + 1:]:
        match = PEAK_ENTRY.match(line)
        if not match:
            break  # the end of the breakdown
        current = int(match.group(3).replace(" ", ""))
        if current:  # a buffer (loops and calls hold theirs below them)
            buffers.append((current, match.group(1)))
    return peak, sorted(buffers, key=lambda b: -b[0])


def xla_point(length):
    dump_dir = tempfile.mkdtemp(prefix="memory_profile_hlo_")
    _common.add_xla_flags(f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text")
    net = train_step.build("reformer", length, True)
    # One step: XLA dumps the plan when it compiles, on the first call.
    net.train_on_batch(*train_step.batch("reformer", length))
    peak, buffers = xla_peak_buffers(dump_dir)
    _common.emit({
        "length": length,
        "planned_peak_mib": round(peak / 2**20),
        "peak_rss_mib": round(_common.peak_rss_mb()),
        "tensors": [[round(b / 2**20, 1), name, "", ""] for b, name in buffers],
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="tensors to print")
    parser.add_argument("--jit", action="store_true",
                        help="XLA: the buffers live at the program's planned peak")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _common.check_length_and_steps(parser, args)
    if args.point:
        if args.jit:
            return xla_point(args.length)
        return point(args.length, args.steps)
    if not args.jit:
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--length",
           str(args.length), "--steps", str(args.steps)] + (["--jit"] if args.jit else [])
    record = _common.run_json(cmd, timeout=3600, prefix="RESULT ")
    if "tensors" not in record:
        sys.exit(f"memory profile failed: {record}")
    rows = [{"mib": mib, "op": op, "scope": short_scope(op), "shape": shape, "dtype": dtype}
            for mib, op, shape, dtype in record["tensors"]]
    path = _common.write_csv(
        f"memory_profile_{args.length}{'_xla' if args.jit else ''}.csv", rows)
    print(f"wrote {path}")
    if args.jit:
        print(f"length {args.length}, XLA: planned peak {record['planned_peak_mib']} MiB, "
              f"process peak RSS {record['peak_rss_mib']} MiB")
    else:
        print(f"length {args.length}: allocator peak per step "
              f"{record['allocator_peak_mib']} MiB, traced peak "
              f"{record['traced_peak_mib']} MiB, process peak RSS "
              f"{record['peak_rss_mib']} MiB")
    print("| MiB | allocated by | shape |")
    print("|---|---|---|")
    for row in rows[:args.top]:
        print(f"| {row['mib']} | {row['op'][-90:]} | {row['shape']} |")


if __name__ == "__main__":
    main()
