"""Shared plumbing of the benchmarks: one fresh process per point, CSV out.

Every point runs in its own Python process so that its peak RSS is its own
(ru_maxrss never goes down within a process), and the parent collects one
JSON line per point. Ratios are only ever formed between points of one run.
"""

import csv
import glob
import json
import os
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def best_time(fn, repeats):
    """The best of `repeats` wall-clock timings of `fn()`, in seconds (the
    least disturbed by other load on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def emit(record):
    """Called in the child: print the point's result as the last line."""
    print("RESULT " + json.dumps(record), flush=True)


# The PyTorch peer (HF transformers) lives in its own venv: benchmarks/peers.
PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
PEER_PYTHON = os.path.join(PEERS, ".venv", "bin", "python")


def run_peer(script, args, timeout=3600):
    """Run benchmarks/peers/`script` with `args` in the peer's venv; its
    record (the last stdout line, JSON), or a `status` saying what failed."""
    return run_json([PEER_PYTHON, os.path.join(PEERS, script), *map(str, args)],
                    timeout)


def require_peer(parser):
    """A clear argparse error when the peer's venv has not been made."""
    if not os.path.exists(PEER_PYTHON):
        parser.error(f"the peer's venv is missing ({PEER_PYTHON}); create it with "
                     "`bash benchmarks/peers/setup.sh` (torch CPU + transformers)")


def check_length_and_steps(parser, args):
    """`--length` a positive multiple of 64 (the bucket size) and `--steps`
    at least 1, or the parser's usage error naming the value."""
    if args.length < 64 or args.length % 64:
        parser.error(f"--length must be a positive multiple of 64. Received: {args.length}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1. Received: {args.steps}")


def run_point(script, args, timeout=1800):
    """Run `script --point args...` in a fresh process; return its record.

    A point that crashes or is killed (e.g. out of memory) comes back as a
    record with `status` saying so instead of stopping the sweep.
    """
    cmd = [sys.executable, script, "--point", *map(str, args)]
    return run_json(cmd, timeout, prefix="RESULT ")


def run_json(cmd, timeout=1800, prefix=None):
    """Run `cmd` in a fresh process; its record is its last stdout line that
    starts with `prefix` (None: the last line, plain JSON, as the peer
    scripts in benchmarks/peers print). Failures come back as `status`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if prefix is None:
        lines = lines[-1:]
    for line in reversed(lines):
        if prefix is None or line.startswith(prefix):
            try:
                record = json.loads(line[len(prefix or ""):])
            except ValueError:
                break
            if isinstance(record, dict):
                record.setdefault("status", "ok")
                return record
            break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"status": f"failed rc={proc.returncode} after "
                      f"{time.time() - start:.0f}s: {tail[0][:200]}"}


def write_csv(name, rows):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(name):
    """The rows (dicts of strings) of benchmarks/results/`name`."""
    with open(os.path.join(RESULTS, name), newline="") as f:
        return list(csv.DictReader(f))


def progress(message):
    print(message, file=sys.stderr, flush=True)


def finish_length_figure(fig, axes, titles, suptitle, path):
    """The sweeps' common figure style: log-log axes over sequence length,
    one title per panel, a legend in each, then the figure saved to `path`."""
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def xplane_paths(logdir):
    """The profiler's trace files under `logdir` (tf.profiler.experimental)."""
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {logdir}")
    return paths


def read_xspace(logdir):
    """The profiler's trace under `logdir` as an XSpace (planes, lines, events)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_paths(logdir)[0], "rb") as f:
        space.ParseFromString(f.read())
    return space


def largest_xla_dump(dump_dir, suffix):
    """The largest file XLA dumped under `dump_dir` whose name ends with
    `suffix`: the training step's module (smaller ones are helpers)."""
    paths = glob.glob(os.path.join(dump_dir, f"*{suffix}"))
    if not paths:
        raise RuntimeError(f"XLA dumped no *{suffix} under {dump_dir}")
    return max(paths, key=os.path.getsize)


def add_xla_flags(flags):
    """Appends `flags` to XLA_FLAGS; only takes effect before XLA starts."""
    before = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{before} {flags}".strip()
