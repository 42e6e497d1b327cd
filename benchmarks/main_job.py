"""The main job (`examples/train_lm.py`) with its defaults and as the paper's model.

Runs the example twice, one run after the other, each in its own process and
at the same budget (steps, batch, sequence length, learning rate): once with
its default flags and once with the two options that go beyond the paper
turned off (`--value-shift off --short-convolution 0`). Each run prints its
validation bits per byte, gzip -9's on the same bytes and its training
seconds; this script collects them into benchmarks/results/main_job.csv.

    python benchmarks/main_job.py            # about 25 minutes on a 2-core CPU
    python benchmarks/main_job.py --only paper   # one row, the others kept
    python benchmarks/main_job.py --table    # the CSV as docs/learning.md's table

Bits per byte do not depend on the machine's load; training seconds do.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import _common

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "train_lm.py")

PAPER = ["--value-shift", "off", "--short-convolution", "0"]
# (model, flags): the paper's model differs from the default only in
# PAPER; the last row checks that the default's learning rate is not what
# holds the paper's model back.
CONFIGS = [
    ("default", []),
    ("paper", PAPER),
    ("paper, lower rate", PAPER + ["--learning-rate", "2e-3"]),
]

SUMMARY = re.compile(
    r"validation bits per byte: (?P<bits>[\d.]+) .*?gzip -9 on the same bytes: "
    r"(?P<gzip>[\d.]+); training took (?P<seconds>\d+)s, (?P<steps>\d+) steps")


def parse(stdout):
    """The example's summary line as a record, or None if it is missing."""
    match = SUMMARY.search(stdout)
    if match is None:
        return None
    return {"bits_per_byte": float(match["bits"]),
            "gzip_bits_per_byte": float(match["gzip"]),
            "train_seconds": int(match["seconds"]), "steps": int(match["steps"])}


def run(model, flags, extra, timeout):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, EXAMPLE, "--run-dir", run_dir, *flags, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=timeout)
    record = parse(proc.stdout)
    if record is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise SystemExit(f"{model}: no summary line (rc={proc.returncode}): {tail[0]}")
    return {"model": model, "flags": " ".join(flags), **record}


def table(rows):
    """The CSV's rows as docs/learning.md's markdown table."""
    lines = ["| model | flags | validation bits per byte | gzip -9 | steps | training seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        flags = f"`{row['flags']}`" if row["flags"] else "(defaults)"
        lines.append(f"| {row['model']} | {flags} | {float(row['bits_per_byte']):.3f} | "
                     f"{float(row['gzip_bits_per_byte']):.3f} | {row['steps']} | "
                     f"{row['train_seconds']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true",
                        help="print the CSV as docs/learning.md's table")
    parser.add_argument("--only", choices=[name for name, _ in CONFIGS],
                        help="run one of the two models")
    parser.add_argument("--timeout", type=int, default=3600, help="per run, seconds")
    args, extra = parser.parse_known_args()
    if args.table:
        print(table(_common.read_csv("main_job.csv")))
        return
    done = {}
    if args.only and os.path.exists(os.path.join(_common.RESULTS, "main_job.csv")):
        done = {row["model"]: row for row in _common.read_csv("main_job.csv")}
    for model, flags in CONFIGS:
        if args.only and model != args.only:
            continue
        done[model] = run(model, flags, extra, args.timeout)
        print(done[model], flush=True)
    order = [model for model, _ in CONFIGS]
    rows = sorted(done.values(), key=lambda row: order.index(row["model"]))
    print(_common.write_csv("main_job.csv", rows))


if __name__ == "__main__":
    main()
