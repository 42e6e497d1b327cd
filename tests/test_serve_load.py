"""benchmarks/serve_load.py: the example's SavedModel under concurrent load,
served by a process that has TensorFlow and nothing of this package.

A quick test (also `-m slow`) runs `--smoke` (the example's smoke model, 3 clients, 100
requests of which 10 malformed): every answer equals the sequential one and
every malformed request (wrong dtype, wrong rank, a length above the
maximum, an empty batch) is an InvalidArgumentError, with the requests after
it still answered. The slow test is the full run (8 clients, 6,000
requests): no mismatch, and RSS from request 2,000 to 6,000 grows under 1%
(`serve_load.growth`: the medians of the first and the last quarter of that
span, which quick tests check on made-up readings).
"""

import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def serve_load(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("serve_load")


def load_run(serve_load, *argv):
    argv = list(argv)
    return serve_load.run(serve_load.parse(argv), argv)


def trace(readings, every=500):
    return dict(trace=[[every * (k + 1), rss] for k, rss in enumerate(readings)])


def test_growth_reads_a_steady_climb_through_noise(serve_load):
    # 13 readings, 200 MiB base: a leak of 0.01 MiB per request adds 40 MiB
    # (20%) from 2,000 to 6,000, under +-15 MiB of alternating noise.
    noise = [15 * (-1) ** k for k in range(12)]
    climb = [200 + 0.01 * 500 * (k + 1) + noise[k] for k in range(12)]
    change = serve_load.growth(trace(climb))
    # Readings 2,000-3,000 and 5,000-6,000 are k = 3..5 and 9..11.
    expected = 100 * (sorted(climb[9:12])[1] - sorted(climb[3:6])[1]) / sorted(climb[3:6])[1]
    assert change == pytest.approx(expected) and change > 10


def test_growth_is_not_moved_by_one_outlying_reading(serve_load):
    # Flat at 850 MiB but for a 20 MiB spike at request 6,000: the last
    # reading alone would read +2.4%.
    readings = [850.0] * 11 + [870.0]
    assert serve_load.growth(trace(readings)) == 0.0


def test_growth_needs_the_whole_span(serve_load):
    assert serve_load.growth(trace([850.0] * 10)) is None  # up to 5,000 requests


@pytest.mark.slow  # ~20 s; served signatures and bad requests: tests/test_export.py
def test_smoke_load_is_exact_and_rejects_malformed_requests(serve_load):
    record = load_run(serve_load, "--smoke")
    assert record["requests"] == 100 and record["clients"] == 3
    assert record["signatures"].split() == [
        "serving_default", "with_padding_mask", "generate", "generate_text"]
    assert record["mismatches"] == 0, record["errors"]
    assert record["malformed_failures"] == []
    assert record["malformed_handled"] == record["malformed"] == 10
    # Every kind was sent, each to a logits and to a generation signature,
    # and the well-formed requests around them were answered exactly.
    assert sorted(record["malformed_by_kind"]) == sorted(
        f"{kind} {signature}" for kind in serve_load.MALFORMED
        for signature in ("serving_default", "generate"))


@pytest.mark.slow
def test_full_load_rss_is_flat(serve_load):
    record = load_run(serve_load)
    assert record["requests"] == 6000 and record["clients"] == 8
    assert record["mismatches"] == 0, record["errors"]
    assert record["malformed_handled"] == record["malformed"] == 120
    assert serve_load.growth(record) < 1.0, record["rss_mb"]
