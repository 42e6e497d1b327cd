import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import gc  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# Property-based tests (hypothesis). The default run is reproducible (a fixed
# sequence of examples, no example database) and small; the tests marked
# `slow` (`-m slow`) raise `max_examples` themselves and draw fresh examples
# at every run. No deadline: the first call of a layer configuration traces
# it, and graph/XLA examples compile. No "explain" phase after shrinking
# (minutes of reruns, for comments on which draws matter).
_PHASES = [p for p in Phase if p != Phase.explain]
settings.register_profile(
    "default", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow], phases=_PHASES,
)
settings.register_profile(
    "slow", deadline=None, derandomize=False, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow], phases=_PHASES,
)
settings.load_profile("default")


@pytest.fixture
def no_gc_on_variable_delete(monkeypatch):
    """Keras' `Layer.__delattr__` runs `gc.collect()` for every variable it
    deletes, which `quantize` does once per kernel: late in a test session,
    with a large heap, that is most of a quantization test's time (65-77 s
    each in CI). Collection frees memory; it does not change any result."""
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default in pyproject.toml): one test process per core
    plus one, at most 4. Many tests wait on processes of their own (example
    runs, workers, a model server), which leaves a core idle with one test
    process per core; each process holds its own TensorFlow runtime (about
    1-2 GB by the end of a run), so not more than that."""
    return max(1, min((os.cpu_count() or 1) + 1, 4))
