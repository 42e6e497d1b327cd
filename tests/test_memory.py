"""keras_reformer.memory: freed memory goes back to the operating system.

The reference is the kernel's own count of the process' resident pages
(/proc/self/statm), around blocks that C's malloc hands out and takes back:
freed blocks below one still in use stay resident until malloc_trim.
"""

import ctypes
import os
import platform
import threading
import time

import numpy as np
import pytest

from keras_reformer import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK = 64 * 1024  # below malloc's mmap threshold: carved from an arena
BLOCKS = 1600  # 100 MiB


def resident_mib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _libc():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def freed_but_held():
    """Touches 100 MiB of malloc'd blocks, frees all but the last (which
    keeps the heap's top, so free cannot shrink it), and returns a function
    that frees the last one."""
    libc = _libc()
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)
    for block in blocks[:-1]:
        libc.free(block)
    return lambda: libc.free(blocks[-1])


needs_glibc = pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")


def test_available_on_glibc():
    assert memory.available() == GLIBC


@needs_glibc
def test_release_returns_freed_blocks():
    before = resident_mib()
    release_last = freed_but_held()
    held = resident_mib() - before
    try:
        assert held > 80, held  # the freed blocks are still resident
        assert memory.release_freed_memory()
        assert resident_mib() - before < held - 80
    finally:
        release_last()


@needs_glibc
def test_context_returns_freed_memory_while_the_block_runs():
    before = resident_mib()
    with memory.returning_freed_memory(interval_s=0.05):
        release_last = freed_but_held()
        held = resident_mib() - before
        deadline = time.monotonic() + 5
        while resident_mib() - before > held - 80 and time.monotonic() < deadline:
            time.sleep(0.05)
        during = resident_mib() - before
    release_last()
    assert during < held - 80, (held, during)


def _trim_threads():
    return [t for t in threading.enumerate() if t.name == "keras_reformer.memory"]


@needs_glibc
def test_thread_runs_only_inside_the_block():
    with memory.returning_freed_memory():
        assert len(_trim_threads()) == 1
    assert _trim_threads() == []


@needs_glibc
def test_thread_stops_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"):
        with memory.returning_freed_memory():
            raise RuntimeError("inside")
    assert _trim_threads() == []


@pytest.mark.parametrize("value", [0, -1.0, True, "0.1", None, float("nan")])
def test_interval_must_be_positive_seconds(value):
    with pytest.raises(ValueError, match=r"`interval_s` must be a positive number\. Received: interval_s="):
        memory.returning_freed_memory(interval_s=value)


@needs_glibc
def test_first_call_only_runs_inside_the_context():
    seen = []

    def step(x):
        seen.append(len(_trim_threads()))
        return x + 1

    wrapped = memory.first_call_returns_freed_memory(step)
    assert [wrapped(1), wrapped(2), wrapped(3)] == [2, 3, 4]
    assert seen == [1, 0, 0]
    assert memory.first_call_returns_freed_memory(wrapped) is wrapped
    assert memory.first_call_returns_freed_memory(None) is None


@pytest.mark.parametrize("value, returns", [("", True), ("0", True), ("1", False),
                                            ("yes", False)])
def test_environment_turns_the_default_off(monkeypatch, value, returns):
    monkeypatch.setenv(memory.KEEP_ENV, value)
    assert memory.models_return_freed_memory() is returns

    def step():
        return len(_trim_threads())

    wrapped = memory.first_call_returns_freed_memory(step)
    assert (wrapped is step) is (not returns)
    if GLIBC:
        assert wrapped() == int(returns)


@needs_glibc
def test_causal_lm_trains_and_evaluates_with_its_first_calls_inside(monkeypatch):
    import keras

    import keras_reformer as kr

    entered = []
    original = memory.returning_freed_memory

    class Recording(original):
        def __enter__(self):
            entered.append(len(_trim_threads()))
            return super().__enter__()

    monkeypatch.setattr(memory, "returning_freed_memory", Recording)
    keras.utils.set_random_seed(0)
    model = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
        vocabulary_size=32, num_layers=2, hidden_dim=16, num_heads=2, key_dim=8,
        intermediate_dim=32, max_sequence_length=64, bucket_size=8, causal=True))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])
    ids = np.random.default_rng(0).integers(1, 32, size=(2, 64)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    y = np.roll(ids, -1, axis=1)
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert entered == [0]  # once, for the first call
    model.evaluate(x, y, verbose=0)
    model.evaluate(x, y, verbose=0)
    assert entered == [0, 0]
    assert _trim_threads() == []
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
