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


# Modules whose tests take tens of seconds each (their own processes, XLA
# training steps, exports). Under pytest-xdist each worker starts with an
# equal contiguous share of the collected tests and takes work from the
# others when it runs out; long tests collected last end the run with one
# busy worker and idle ones. So the long tests are dealt out first, one
# share of them at the head of each worker's share.
LONG_MODULES = (
    "test_examples.py", "test_multiworker.py", "test_serve_load.py", "test_export.py",
    "test_distribute.py", "test_quantization.py", "test_calibrated_quantization.py",
    "test_drop_in.py", "test_resume.py", "test_bad_ids.py", "test_reversible_sequence.py",
    "test_stacked_weights.py", "test_transformers_reformer.py", "test_fused_ffn_backward.py",
    "test_tokenizers.py",
)


def _deal_long_tests_first(items, workers):
    long = [i for i in items if i.path.name in LONG_MODULES]
    short = [i for i in items if i.path.name not in LONG_MODULES]
    ordered = []
    for k in range(workers):
        ordered += long[k::workers]
        ordered += short[k * len(short) // workers:(k + 1) * len(short) // workers]
    return ordered


@pytest.hookimpl(trylast=True)  # after `-m` has deselected the slow tests
def pytest_collection_modifyitems(config, items):
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and workers > 1:
        items[:] = _deal_long_tests_first(items, workers)
