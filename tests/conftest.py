import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def no_gc_on_variable_delete(monkeypatch):
    """Keras' `Layer.__delattr__` runs `gc.collect()` for every variable it
    deletes, which `quantize` does once per kernel: late in a test session,
    with a large heap, that is most of a quantization test's time (65-77 s
    each in CI). Collection frees memory; it does not change any result."""
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
