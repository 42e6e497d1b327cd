"""benchmarks/memory_profile.py --jit: the buffers live at XLA's planned
peak, read from a buffer-assignment dump (a canned one: no TensorFlow)."""

import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The shape of XLA's dump: other sections, then the peak's breakdown as a
# tree (loops hold their buffers below them, with current: 0), then more.
DUMP = """\
allocation 0: size 1048576, parameter 0
Total bytes used: 3500 (3.4KiB)
  Stack trace breakdown for peak usage: 3 500 bytes
    a_inference_one_step (100.0%, total: 3 500 bytes, current: 0 bytes, remaining: 3 500 bytes)
      ├── mul_2 (57.1%, total: 2 000 bytes, current: 2 000 bytes, remaining: 1 500 bytes)
      ├── while (28.6%, total: 1 000 bytes, current: 0 bytes, remaining: 1 500 bytes)
      │   └── body (28.6%, total: 1 000 bytes, current: 0 bytes, remaining: 1 500 bytes)
      │       └── while/einsum/Einsum (28.6%, total: 1 000 bytes, current: 1 000 bytes, remaining: 500 bytes)
      └── XLA_Args (14.3%, total: 500 bytes, current: 500 bytes, remaining: 0 bytes)
  Live ranges at 12:
    other (5.0%, total: 9 999 bytes, current: 9 999 bytes, remaining: 0 bytes)
"""


@pytest.fixture
def memory_profile(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("memory_profile")


def test_xla_peak_buffers_are_the_breakdown_leaves(memory_profile, tmp_path):
    # The largest dump is the training step's; a smaller one is ignored.
    (tmp_path / "module_1.cpu_after_optimizations-buffer-assignment.txt").write_text(DUMP)
    (tmp_path / "module_0.small-buffer-assignment.txt").write_text(
        "  Stack trace breakdown for peak usage: 8 bytes\n")
    peak, buffers = memory_profile.xla_peak_buffers(str(tmp_path))
    assert peak == 3500
    # The leaves only (not the loop that holds one), largest first, and
    # nothing from the section after the breakdown.
    assert buffers == [(2000, "mul_2"), (1000, "while/einsum/Einsum"), (500, "XLA_Args")]
    assert sum(size for size, _ in buffers) == peak


def test_short_scope_drops_loop_frames(memory_profile):
    name = "while/body/_145/while/while_1/body/_70/lsh_unsort/Pad_1"
    assert memory_profile.short_scope(name) == "lsh_unsort/Pad_1"
    assert memory_profile.short_scope("a/" * 50 + "op", keep=10) == ("a/" * 50 + "op")[-10:]
