"""The accelerator check: the figures a GPU machine is wanted for, in one run.

`bash benchmarks/accelerator_check.sh` runs this driver (`--smoke`: the
same checks, shrunk to run on a CPU: about 2 CPU-minutes). Every check is
a fresh Python process (an out-of-memory error or a crash ends only that
check, and each peak is the check's own) with its own timeout, inside a
budget that keeps the whole run under 10 minutes. In order:

- `train_step`: the XLA training step (`jit_compile=True`, Adam, batch 1)
  of benchmarks/train_step.py's reference ReformerCausalLM at 16K and 64K
  tokens, in float32 and in Keras' "mixed_bfloat16" policy;
- `depth_memory`: benchmarks/depth_memory.py's reversible stack at 16K
  under XLA with 1 and then 8 blocks (two processes, one line): the peak
  of each and their difference per block;
- `cached_decoding`: keras-hub `generate()` under XLA from a 16K prompt,
  per-token time (benchmarks/generate.py's cached kind);
- `mha_train_step`: benchmarks/train_step.py's MultiHeadAttention model of
  the same width, heads and layers (causal mask, ordinary residual blocks)
  at 4K, 8K, 16K, ... until a length fails (out of memory) or the budget
  ends: the longest that fitted, with its step time.

Each check prints one JSON line on stdout, with the keys in KEYS (and a few
more per check); `peak_device_mb` is TensorFlow's allocator peak on GPU:0
(`tf.config.experimental.get_memory_info`), or the process's peak RSS on a
CPU. A last line, `"check": "summary"`, gives every check's status; the
exit status is 0 when all are "ok". Progress goes to stderr. Nothing is
downloaded or installed here.
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import depth_memory  # noqa: E402
import generate  # noqa: E402
import train_step  # noqa: E402

KEYS = ("check", "length", "dtype", "device", "tokens_per_s", "step_ms",
        "peak_device_mb", "status", "error")
STATUSES = ("ok", "oom", "timeout", "error")
# Per-check timeouts (seconds) are each mode's `timeouts`; `budget` bounds
# the whole run. A check is not started with less than MIN_START left.
MIN_START = 20
FULL = dict(
    train_lengths=(16384, 65536), dtypes=("float32", "mixed_bfloat16"), steps=3,
    depth_length=16384, depths=(1, 8), prompt=16384, new_tokens=32, repeats=2,
    mha_lengths=tuple(4096 * 2**i for i in range(6)),  # 4K .. 128K
    budget=540, timeouts=dict(train_step=150, depth_memory=100,
                              cached_decoding=180, mha_train_step=90),
)
# --smoke: every check and code path on a CPU, small and fast; a narrower
# one-layer model for the training steps, generate.py's tiny model.
SMOKE = dict(
    FULL, train_lengths=(128, 256), steps=1, depth_length=128, prompt=32,
    new_tokens=64, repeats=3, mha_lengths=(64, 128), budget=900,
    timeouts=dict(train_step=300, depth_memory=300, cached_decoding=300,
                  mha_train_step=300),
)
SMOKE_CONFIG = dict(train_step.CONFIG, num_layers=1, hidden_dim=64, num_heads=2,
                    key_dim=32, intermediate_dim=128, bucket_size=32)


# --- in the check's process ---------------------------------------------

def device_name():
    """"GPU:0 <name>" for the first GPU TensorFlow sees, else "CPU"."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    return f"GPU:0 {name}".strip()


def peak_memory_mb(device):
    """The allocator's peak on GPU:0 so far, or this process's peak RSS."""
    if device == "CPU":
        return round(_common.peak_rss_mb(), 1)
    import tensorflow as tf

    return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)


def is_oom(error):
    """Whether an exception (or its text) says that memory ran out."""
    text = str(error)
    return (type(error).__name__ == "ResourceExhaustedError"
            or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def train_point(model, length, dtype, steps, smoke):
    import keras

    keras.mixed_precision.set_global_policy(dtype)
    net = train_step.build(model, length, True, SMOKE_CONFIG if smoke else None)
    x, y = train_step.batch(model, length)
    seconds = train_step.best_step(net, x, y, steps)
    return dict(tokens_per_s=round(length / seconds), step_ms=round(1e3 * seconds, 2))


def depth_point(blocks, length, steps):
    import tensorflow as tf

    stack = depth_memory.build_stack(blocks, reversible=True)
    shape = (1, length, depth_memory.D_MODEL)
    stack.build([shape] * 2)
    step = depth_memory.make_step(stack, jit=True)
    x = tf.random.normal(shape, seed=0)
    step(x)[0].numpy()  # trace, compile, run
    seconds = _common.best_time(lambda: step(x)[0].numpy(), steps)
    return dict(blocks=blocks, tokens_per_s=round(length / seconds),
                step_ms=round(1e3 * seconds, 2))


def decode_point(prompt, new_tokens, repeats, smoke):
    import numpy as np

    lm = generate.build(prompt + new_tokens, tiny=smoke)
    ids = np.random.default_rng(0).integers(0, 256, size=(1, prompt)).astype(np.int32)
    timing = generate.cached_timing(lm, ids, new_tokens, repeats, jit=True)
    return dict(tokens_per_s=round(timing["tokens_per_s"], 1),
                step_ms=round(timing["per_token_ms"], 3),
                per_token_ms=round(timing["per_token_ms"], 3),
                prompt_ms=round(timing["prompt_ms"], 1), new_tokens=new_tokens)


POINTS = {
    "device": lambda: {},
    "train_step": lambda length, dtype, steps, smoke: train_point(
        "reformer", int(length), dtype, int(steps), smoke == "1"),
    "mha_train_step": lambda length, dtype, steps, smoke: train_point(
        "mha", int(length), dtype, int(steps), smoke == "1"),
    "depth_memory": lambda length, dtype, steps, smoke, blocks: depth_point(
        int(blocks), int(length), int(steps)),
    "cached_decoding": lambda length, dtype, steps, smoke, new_tokens: decode_point(
        int(length), int(new_tokens), int(steps), smoke == "1"),
}


def point(check, *args):
    """Run one check here and print its record (`_common.emit`), whatever
    happens: an exception becomes status "oom" or "error"."""
    record = {"check": check}
    device = "unknown"
    try:
        device = device_name()
        record.update(POINTS[check](*args), status="ok")
    except Exception as error:  # noqa: BLE001 - every failure is a figure too
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        record.update(status="oom" if is_oom(error) else "error", error=message[:300])
    record.update(device=device, peak_rss_mb=round(_common.peak_rss_mb(), 1))
    if device != "unknown":
        record["peak_device_mb"] = peak_memory_mb(device)
    _common.emit(record)


# --- in the driver -------------------------------------------------------

class Run:
    """The driver's state: mode, time budget, the device and the lines."""

    def __init__(self, mode, budget):
        self.mode, self.smoke = mode, mode is SMOKE
        self.deadline = time.monotonic() + budget
        self.device = "unknown"
        self.lines = []

    def child(self, check, length, dtype, steps, *extra):
        """One check's process: its record with every key of KEYS and a
        status in STATUSES (a process that died or timed out included)."""
        started = time.monotonic()
        left = self.deadline - started
        if left < MIN_START:
            record = {"status": "timeout", "error": "not started: the run's time budget is spent"}
        else:
            timeout = min(self.mode["timeouts"].get(check, 60), left)
            record = _common.run_point(
                os.path.abspath(__file__),
                [check, length, dtype, steps, int(self.smoke), *extra], timeout=timeout)
            if record.get("status") not in STATUSES:  # _common.run_json's failures
                record = dict(status=classify(record["status"]), error=record["status"])
        record.update(check=check, length=length, dtype=dtype,
                      process_s=round(time.monotonic() - started, 1))
        if record.get("device", "unknown") == "unknown":
            record["device"] = self.device
        return {**{key: record.get(key) for key in KEYS}, **record}

    def print(self, record, label):
        record = {**{key: record.get(key) for key in KEYS}, **record}
        print(json.dumps(record), flush=True)
        self.lines.append((label, record))
        _common.progress(f"{label}: {record['status']}"
                         + (f" ({record['error']})" if record["error"] else ""))


def classify(status):
    """The status of a process that printed no record (_common.run_json's
    text): killed by SIGKILL is taken for the kernel's OOM killer."""
    if status.startswith("timeout"):
        return "timeout"
    if "rc=-9 " in status or "rc=137 " in status or is_oom(status):
        return "oom"
    return "error"


def probe_device(run):
    """The device the checks' processes see (a process of its own)."""
    record = _common.run_point(os.path.abspath(__file__), ["device"], timeout=120)
    run.device = record.get("device", "unknown")
    return record


def train_checks(run):
    mode = run.mode
    for length in mode["train_lengths"]:
        for dtype in mode["dtypes"]:
            record = run.child("train_step", length, dtype, mode["steps"])
            run.print(record, f"train_step {length} {dtype}")


def depth_check(run):
    mode = run.mode
    points = [run.child("depth_memory", mode["depth_length"], "float32",
                        mode["steps"], blocks) for blocks in mode["depths"]]
    first, last = points[0], points[-1]
    failed = [p for p in points if p["status"] != "ok"]
    record = dict(last, **(failed[0] if failed else {}))
    record.update(check="depth_memory", blocks=list(mode["depths"]),
                  peak_device_mb_by_blocks={str(b): p.get("peak_device_mb")
                                            for b, p in zip(mode["depths"], points)})
    if not failed:
        record["per_block_mb"] = round(
            (last["peak_device_mb"] - first["peak_device_mb"])
            / (mode["depths"][-1] - mode["depths"][0]), 2)
    run.print(record, f"depth_memory {mode['depth_length']} blocks "
                      f"{mode['depths'][0]} vs {mode['depths'][-1]}")


def decode_check(run):
    mode = run.mode
    record = run.child("cached_decoding", mode["prompt"], "float32", mode["repeats"],
                       mode["new_tokens"])
    run.print(record, f"cached_decoding {mode['prompt']}")


def mha_check(run):
    """The MultiHeadAttention model at doubling lengths until one fails:
    the longest that fitted (`length`) and why the ladder stopped."""
    mode, ladder, fitted = run.mode, [], None
    stopped = "cap"  # every length of the ladder fitted
    for length in mode["mha_lengths"]:
        record = run.child("mha_train_step", length, "float32", mode["steps"])
        ladder.append({k: record[k] for k in ("length", "status", "step_ms")})
        if record["status"] != "ok":
            stopped = record["status"]
            break
        fitted = record
    if fitted is None:  # not even the shortest: the failure is the figure
        fitted = record
    fitted = dict(fitted, ladder=ladder, stopped_by=stopped)
    run.print(fitted, "mha_train_step (longest that fitted)")


# Every check by its lines' `check` key (--only's names), in the order they run.
CHECKS = {"train_step": train_checks, "depth_memory": depth_check,
          "cached_decoding": decode_check, "mha_train_step": mha_check}


def csv_rows(records, run=None):
    """The printed records as flat CSV rows: one per check, the
    MultiHeadAttention ladder one row per length tried (the longest that
    fitted with its peak), lists and dicts as JSON, no summary line."""
    rows = []
    for record in records:
        if record.get("check") == "summary":
            continue
        record = dict(record)
        ladder = record.pop("ladder", None)
        if ladder is None:
            rung_rows = [record]
        else:
            # The longest length that fitted keeps the record's own figures
            # (its peak); the other lengths have the ladder's alone.
            others = {**{key: None for key in KEYS}, "check": record["check"],
                      "dtype": record.get("dtype"), "device": record.get("device")}
            rung_rows = []
            for rung in ladder:
                row = {**(record if rung["length"] == record.get("length") else others),
                       **rung}
                if row.get("step_ms"):
                    row["tokens_per_s"] = round(1e3 * row["length"] / row["step_ms"])
                rung_rows.append(row)
        for row in rung_rows:
            row = {key: json.dumps(value) if isinstance(value, (list, dict)) else value
                   for key, value in row.items()}
            rows.append(row if run is None else {"run": run, **row})
    return rows


def from_jsonl(paths, name):
    """Write benchmarks/results/`name` from the stdout of earlier runs (one
    file per run, `run` numbering them): for a machine whose checkout is
    thrown away after the run, whose printed lines are what comes back."""
    rows = []
    for run, path in enumerate(paths, start=1):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.startswith("{")]
        rows += csv_rows(records, run=run)
    return _common.write_csv(name, rows)


def no_gpu_record(device):
    """The line for a full run where TensorFlow sees no GPU, or None."""
    if device != "CPU":
        return None
    seen = "an NVIDIA GPU is present but " if shutil.which("nvidia-smi") else ""
    return {"check": "device", "device": device, "status": "error", "error": (
        f"{seen}TensorFlow sees no GPU: the figures would be a CPU's. Install "
        "TensorFlow's CUDA libraries (pip install 'tensorflow[and-cuda]'), or "
        "run --smoke for the CPU smoke test.")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every check, tiny, on whatever device (a CPU: a few minutes)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all checks (default 540; --smoke 900)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), metavar="CHECK",
                        help="run these checks alone (in their usual order): "
                             + ", ".join(CHECKS))
    parser.add_argument("--csv", metavar="NAME",
                        help="also write the lines as rows of benchmarks/results/NAME")
    parser.add_argument("--from-jsonl", nargs="+", metavar="FILE",
                        help="run nothing: write --csv from earlier runs' stdout")
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        return point(*args.point)
    if args.from_jsonl:
        if not args.csv:
            parser.error("--from-jsonl needs --csv NAME: the file to write")
        print(from_jsonl(args.from_jsonl, args.csv))
        return 0
    mode = SMOKE if args.smoke else FULL
    budget = mode["budget"] if args.budget_s is None else args.budget_s
    if budget <= 0:
        parser.error(f"--budget-s must be positive. Received: {args.budget_s}")
    start = time.monotonic()
    run = Run(mode, budget)
    probe = probe_device(run)
    _common.progress(f"device: {run.device}")
    refusal = None if args.smoke else no_gpu_record(run.device)
    if probe.get("status") != "ok" or refusal:
        run.print(refusal or dict(probe, check="device", status="error"), "device")
        return 2
    for name, check in CHECKS.items():
        if not args.only or name in args.only:
            check(run)
    statuses = {label: record["status"] for label, record in run.lines}
    all_ok = all(status == "ok" for status in statuses.values())
    print(json.dumps({"check": "summary", "device": run.device, "smoke": args.smoke,
                      "all_ok": all_ok, "statuses": statuses,
                      "wall_s": round(time.monotonic() - start, 1)}), flush=True)
    if args.csv:
        _common.progress(_common.write_csv(args.csv, csv_rows(r for _, r in run.lines)))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
