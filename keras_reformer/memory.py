"""Handing the memory a compiler freed back to the operating system.

On Linux with glibc, memory that a program frees stays in the process (in
malloc's arenas) until malloc reuses it or `malloc_trim` returns it.
Compiling a training step, XLA's above all, allocates and frees a lot, so
when the step's first run starts much of the process' resident memory is
compiler memory already freed, and the step's own buffers come on top of
it. Returning the freed pages while the first call runs (the compile
happens inside it) lowers that call's peak, the process' peak; later calls
reuse what they allocate. docs/benchmarks.md measures it at 128K tokens.

`ReformerCausalLM` does this by default for the first call of its training
and evaluation steps (`fit`, `train_on_batch`, `evaluate`,
`test_on_batch`). For a model of your own, wrap the call that compiles:

```python
from keras_reformer import memory

with memory.returning_freed_memory():
    model.train_on_batch(x, y)       # compiles, then runs one step
```

Without glibc (macOS, Windows, musl) both helpers do nothing. Setting the
environment variable `KERAS_REFORMER_KEEP_FREED_MEMORY=1` turns the models'
default off (`returning_freed_memory` itself still works).
"""

import ctypes
import os
import threading

from keras_reformer import _checks

# How often the helper thread returns freed memory while a call runs:
# often enough to return the compiler's memory before the step's buffers
# take their place (a compile frees its memory over seconds), and each
# malloc_trim only walks malloc's free lists, a small cost beside a step.
INTERVAL_S = 0.1


def _load_malloc_trim():
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _load_malloc_trim()


def available():
    """True where the C library can return freed memory (glibc)."""
    return _MALLOC_TRIM is not None


def release_freed_memory():
    """Returns the memory malloc holds freed to the operating system, once.

    Returns True when some was returned, False when none was (or without
    glibc)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class returning_freed_memory:
    """Context manager: a thread returns freed memory every `interval_s`
    seconds while the block runs, and once more when it ends.

    Args:
        interval_s: seconds between two returns (> 0).
    """

    def __init__(self, interval_s=INTERVAL_S):
        self.interval_s = _checks.positive_number("interval_s", interval_s)
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.wait(self.interval_s):
            release_freed_memory()

    def __enter__(self):
        if available():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="keras_reformer.memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            release_freed_memory()
        return False


class _FirstCallReturnsFreedMemory:
    """A Keras step function whose first call runs inside
    `returning_freed_memory()` (that call traces and compiles the step)."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 1:
            return self.function(*args, **kwargs)
        with returning_freed_memory():
            return self.function(*args, **kwargs)


KEEP_ENV = "KERAS_REFORMER_KEEP_FREED_MEMORY"


def models_return_freed_memory():
    """False when the environment variable `KERAS_REFORMER_KEEP_FREED_MEMORY`
    is set to anything but "" or "0"."""
    return os.environ.get(KEEP_ENV, "") in ("", "0")


def first_call_returns_freed_memory(function):
    """`function` (a Keras train/test function), its first call run inside
    `returning_freed_memory()`; `function` itself when already wrapped, None,
    or when `models_return_freed_memory()` is False."""
    if function is None or isinstance(function, _FirstCallReturnsFreedMemory) \
            or not models_return_freed_memory():
        return function
    return _FirstCallReturnsFreedMemory(function)
