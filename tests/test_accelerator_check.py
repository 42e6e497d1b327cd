"""benchmarks/accelerator_check.sh: the one command for a GPU machine.

The smoke run (every check, tiny, on this CPU) takes minutes on a shared
2-core machine, so it is `slow`; the default tests check the wrapper's
argument handling and the driver's bookkeeping (statuses, the budget, the
MultiHeadAttention ladder, the lines' keys) with the checks' processes
replaced by canned records.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator_check.sh")


@pytest.fixture
def driver(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("accelerator_check")


def run_script(*args, timeout=60):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def expected_checks(mode):
    """(check, length, dtype) of every line a run in `mode` prints, in order."""
    lines = [("train_step", length, dtype) for length in mode["train_lengths"]
             for dtype in mode["dtypes"]]
    return lines + [("depth_memory", mode["depth_length"], "float32"),
                    ("cached_decoding", mode["prompt"], "float32"),
                    ("mha_train_step", mode["mha_lengths"][-1], "float32")]


@pytest.mark.parametrize("argument", ["--smok", "16384", "--smoke=1"])
def test_a_malformed_argument_is_a_usage_error(argument):
    proc = run_script("--smoke", argument)
    assert proc.returncode == 2
    assert f"unknown argument '{argument}'" in proc.stderr
    assert "usage: bash benchmarks/accelerator_check.sh [--smoke]" in proc.stderr
    assert proc.stdout == ""


def test_help():
    proc = run_script("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage:")


class FakeProcesses:
    """Stands in for `_common.run_point`: canned records by (check, length,
    dtype), else an "ok" one (a depth point's peak: 10 MB per block)."""

    def __init__(self, records):
        self.records, self.calls = records, []

    def __call__(self, script, args, timeout):
        self.calls.append((args, timeout))
        record = {"status": "ok", "device": "GPU:0 Fake"}
        if args[0] != "device":
            blocks = args[-1] if args[0] == "depth_memory" else 1
            record.update(tokens_per_s=1000, step_ms=1.0, peak_device_mb=10.0 * blocks)
        return dict(self.records.get(tuple(args[:3]), record))


def run_driver(driver, monkeypatch, capsys, records, argv=("--smoke",)):
    fake = FakeProcesses(records)
    monkeypatch.setattr(driver._common, "run_point", fake)
    code = driver.main(list(argv))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, lines, fake


def test_driver_lines_statuses_and_ladder(driver, monkeypatch, capsys):
    mode = driver.SMOKE
    long_, dtype = mode["train_lengths"][-1], mode["dtypes"][-1]
    records = {
        # A process killed by SIGKILL (the OOM killer) and one that crashed.
        ("train_step", long_, dtype): {"status": "failed rc=-9 after 3s: "},
        ("cached_decoding", mode["prompt"], "float32"): {
            "status": "failed rc=1 after 2s: boom"},
        # The child's own record of an out-of-memory error.
        ("mha_train_step", mode["mha_lengths"][-1], "float32"): {
            "status": "oom", "error": "ResourceExhaustedError: OOM", "device": "GPU:0 Fake"},
    }
    code, lines, fake = run_driver(driver, monkeypatch, capsys, records)
    assert code == 1
    *checks, summary = lines
    assert [(r["check"], r["length"], r["dtype"]) for r in checks][:-1] == (
        expected_checks(mode)[:-1])
    for record in checks:
        assert set(driver.KEYS) <= set(record) and record["device"] == "GPU:0 Fake"
        assert record["status"] in driver.STATUSES
    by = {(r["check"], r["length"], r["dtype"]): r for r in checks}
    assert by[("train_step", long_, dtype)]["status"] == "oom"
    assert by[("train_step", long_, dtype)]["error"].startswith("failed rc=-9")
    assert by[("cached_decoding", mode["prompt"], "float32")]["status"] == "error"
    depth = checks[len(mode["train_lengths"]) * len(mode["dtypes"])]
    assert depth["per_block_mb"] == 10.0  # (80 - 10) MB over 8 - 1 blocks
    # The ladder stopped at its first failure and reports the one before.
    mha = checks[-1]
    assert (mha["length"], mha["status"], mha["stopped_by"]) == (
        mode["mha_lengths"][-2], "ok", "oom")
    assert [step["status"] for step in mha["ladder"]] == ["ok", "oom"]
    assert summary["check"] == "summary" and summary["all_ok"] is False
    assert list(summary["statuses"].values()).count("ok") == len(checks) - 2


def test_driver_budget_and_no_gpu(driver, monkeypatch, capsys):
    # A spent budget: the checks are not started, each says so.
    monkeypatch.setattr(driver, "MIN_START", 10**6)
    code, lines, fake = run_driver(driver, monkeypatch, capsys, {})
    assert code == 1 and [args[0] for args, _ in fake.calls] == ["device"]
    assert all(r["status"] == "timeout" and "budget" in r["error"] for r in lines[:-1])
    # A full run where TensorFlow sees no GPU: one line, exit 2, nothing run.
    monkeypatch.setattr(driver, "probe_device", lambda run: (
        setattr(run, "device", "CPU") or {"status": "ok", "device": "CPU"}))
    code, lines, _ = run_driver(driver, monkeypatch, capsys, {}, argv=())
    assert code == 2 and len(lines) == 1
    assert lines[0]["check"] == "device" and "sees no GPU" in lines[0]["error"]


def test_csv_rows_from_a_run_and_from_its_printed_lines(driver, monkeypatch, capsys,
                                                         tmp_path):
    # A run with --csv writes its lines as rows; --from-jsonl writes the same
    # rows from the lines it printed (what comes back from a GPU machine).
    mode = driver.SMOKE
    records = {("mha_train_step", mode["mha_lengths"][-1], "float32"): {
        "status": "oom", "error": "ResourceExhaustedError: OOM", "device": "GPU:0 Fake"}}
    monkeypatch.setattr(driver._common, "RESULTS", str(tmp_path))
    code, lines, _ = run_driver(driver, monkeypatch, capsys, records,
                                argv=("--smoke", "--csv", "direct.csv"))
    assert code == 0  # the ladder's stop is its figure, not a failure
    printed = tmp_path / "printed.jsonl"
    printed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert driver.main(["--csv", "converted.csv", "--from-jsonl", str(printed)]) == 0
    direct = driver._common.read_csv("direct.csv")
    converted = driver._common.read_csv("converted.csv")
    assert [row.pop("run") for row in converted] == ["1"] * len(direct)
    assert converted == direct
    # One row per check, the summary left out, the ladder one row per
    # length: the shortest "ok" (1000 tokens/s in its record, 1 ms a step
    # here: length / 1 ms), then the length that ran out of memory.
    checks = [line for line in lines if line["check"] != "summary"]
    assert len(direct) == len(checks) - 1 + len(checks[-1]["ladder"])
    ladder = [row for row in direct if row["check"] == "mha_train_step"]
    assert [(int(r["length"]), r["status"]) for r in ladder] == [
        (mode["mha_lengths"][0], "ok"), (mode["mha_lengths"][1], "oom")]
    assert int(ladder[0]["tokens_per_s"]) == mode["mha_lengths"][0] * 1000
    depth = next(row for row in direct if row["check"] == "depth_memory")
    assert json.loads(depth["blocks"]) == list(mode["depths"])
    with pytest.raises(SystemExit) as exit_:  # nothing to write to: a usage error
        driver.main(["--from-jsonl", str(printed)])
    assert exit_.value.code == 2


def test_the_wrapper_passes_its_options_on(monkeypatch, tmp_path):
    # A stand-in interpreter prints the arguments the driver would get.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nshift; echo "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    proc = subprocess.run(["bash", SCRIPT, "--budget-s", "300", "--only", "depth_memory",
                           "cached_decoding", "--csv", "x.csv", "--smoke"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--budget-s", "300", "--only", "depth_memory",
                                   "cached_decoding", "--csv", "x.csv", "--smoke"]
    proc = subprocess.run(["bash", SCRIPT, "--budget-s"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--budget-s needs a number" in proc.stderr


def test_only_runs_the_named_checks_in_their_order(driver, monkeypatch, capsys):
    code, lines, fake = run_driver(driver, monkeypatch, capsys, {}, argv=(
        "--smoke", "--only", "cached_decoding", "depth_memory"))
    assert code == 0
    assert [line["check"] for line in lines] == ["depth_memory", "cached_decoding", "summary"]
    assert [args[0] for args, _ in fake.calls] == [
        "device", "depth_memory", "depth_memory", "cached_decoding"]
    with pytest.raises(SystemExit) as exit_:
        driver.main(["--smoke", "--only", "train"])
    assert exit_.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_is_oom_and_classify(driver):
    assert driver.is_oom("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    assert driver.classify("timeout after 90s") == "timeout"
    assert driver.classify("failed rc=-9 after 40s: ") == "oom"
    assert driver.classify("failed rc=1 after 4s: ValueError: x") == "error"


@pytest.mark.slow
def test_smoke_run_prints_every_check_once(driver):
    proc = run_script("--smoke", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    *checks, summary = lines
    keys = [(r["check"], r["length"], r["dtype"]) for r in checks]
    assert keys == expected_checks(driver.SMOKE)
    for record in checks:
        assert set(driver.KEYS) <= set(record)
        assert record["status"] == "ok" and record["error"] is None, record
        assert record["device"] == "CPU" and record["peak_device_mb"] > 0
        # (The tiny model's decoding time per token is a difference of two
        # timings, which the machine's load can outweigh: any number here.)
        if record["check"] != "cached_decoding":
            assert record["tokens_per_s"] > 0 and record["step_ms"] > 0
        assert isinstance(record["step_ms"], float)
    assert checks[-1]["stopped_by"] == "cap"
    assert summary["check"] == "summary" and summary["all_ok"] is True
    assert set(summary["statuses"].values()) == {"ok"}
