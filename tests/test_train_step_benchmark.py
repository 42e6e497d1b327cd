"""benchmarks/train_step.py --peer: the medians and ratios of its CSV rows,
with the processes replaced by canned records (no TensorFlow, no peer)."""

import importlib
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def train_step(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("train_step")


def test_peer_rows_are_medians_and_ratios_of_the_rounds(train_step, monkeypatch):
    # Three rounds of (ours graph, ours XLA, peer) at one length: the
    # processes' own figures, in the order the sweep starts them.
    ours = {"off": iter([(100, 900, 700, 200), (300, 950, 700, 250), (200, 990, 700, 290)]),
            "on": iter([(400, 1300, 700, 600), (500, 1350, 700, 650), (450, 1400, 700, 700)])}
    peer = iter([(50, 500, 300, 200), (70, 520, 300, 220), (60, 600, 300, 300)])

    def point(script, args, timeout):
        tokens, peak, floor, above = next(ours[args[2]])
        return dict(status="ok", tokens_per_s=tokens, peak_rss_mb=peak,
                    import_rss_mb=floor, above_import_mb=above)

    def run_peer(script, args):
        tokens, peak, floor, above = next(peer)
        return dict(status="ok", tokens_per_s=tokens, peak_rss_mb=peak,
                    import_rss_mb=floor, above_import_mb=above)

    monkeypatch.setattr(train_step._common, "run_point", point)
    monkeypatch.setattr(train_step._common, "run_peer", run_peer)
    args = types.SimpleNamespace(lengths=[1024], repeats=3, jit=["off", "on"], steps=3)
    rows = {(r["model"], r["jit"]): r for r in train_step.peer_sweep(args, gflops=100.0)}
    graph, xla, hf = rows[("reformer", False)], rows[("reformer", True)], rows[("hf_reformer", False)]
    assert (graph["tokens_per_s"], graph["tokens_per_s_min"], graph["tokens_per_s_max"]) == (
        200, 100, 300)
    assert (hf["tokens_per_s"], hf["above_import_mb"], hf["import_rss_mb"]) == (60, 220, 300)
    assert (graph["above_import_mb"], xla["above_import_mb"]) == (250, 650)
    assert graph["tokens_per_s_ratio"] == round(200 / 60, 3)
    assert graph["peak_rss_ratio"] == round(950 / 520, 3)
    assert graph["above_import_ratio"] == round(250 / 220, 3)
    assert xla["above_import_ratio"] == round(650 / 220, 3)
    assert "above_import_ratio" not in hf


def test_rows_without_a_floor_have_no_floor_ratio(train_step, monkeypatch):
    # Records of runs made before the floor was measured: no floor columns.
    record = dict(status="ok", tokens_per_s=10, peak_rss_mb=100)
    monkeypatch.setattr(train_step._common, "run_point", lambda *a, **k: dict(record))
    monkeypatch.setattr(train_step._common, "run_peer", lambda *a, **k: dict(record))
    args = types.SimpleNamespace(lengths=[1024], repeats=1, jit=["off"], steps=1)
    rows = train_step.peer_sweep(args, gflops=100.0)
    assert all("above_import_mb" not in r and "above_import_ratio" not in r for r in rows)
    assert rows[0]["tokens_per_s_ratio"] == 1.0


def test_sweep_rounds_compare_each_length_with_its_own_rounds_shortest(train_step, monkeypatch):
    # Two rounds of 4K then 128K, XLA only; the machine is slower in round
    # 2, so each 128K is compared with the 4K of its own round.
    tokens = iter([5000, 4600, 4000, 3900])
    started = []

    def point(script, args, timeout):
        started.append(args[1])
        return dict(status="ok", tokens_per_s=next(tokens), peak_rss_mb=1000)

    monkeypatch.setattr(train_step._common, "run_point", point)
    args = types.SimpleNamespace(lengths=[4096, 131072], repeats=2, models=["reformer"],
                                 jit=["on"], steps=2, mha_max_length=8192)
    rows = [r for k in range(2) for r in train_step.sweep_round(args, None, k)]
    assert started == [4096, 131072, 4096, 131072]  # rounds alternate the lengths
    assert [(r["round"], r["length"], r["vs_shortest"]) for r in rows] == [
        (1, 4096, 1.0), (1, 131072, 0.92), (2, 4096, 1.0), (2, 131072, 0.975)]


def test_a_single_sweep_has_no_rounds(train_step, monkeypatch):
    monkeypatch.setattr(train_step._common, "run_point",
                        lambda *a, **k: dict(status="ok", tokens_per_s=10, peak_rss_mb=1))
    args = types.SimpleNamespace(lengths=[1024, 2048], repeats=1, models=["reformer"],
                                 jit=["off"], steps=1, mha_max_length=8192)
    rows = train_step.sweep_round(args, None, 0)
    assert all("round" not in r and "vs_shortest" not in r for r in rows)
