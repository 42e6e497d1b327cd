import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _test_process_settings():
    """Under pytest-xdist, size each worker's TensorFlow thread pools to its
    share of the cores. Each runtime otherwise sizes its pools for the whole
    machine, and with more workers than cores the pools' threads spin and
    preempt one another: on 2 cores with 3 workers, one thread per pool cut
    the CPU time of the same tests by 14%. Set here, before any test module
    imports TensorFlow; the processes that tests start inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", threads)
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", threads)
    # The tests' models are tiny: XLA's compile, not the compiled code,
    # takes their time. Both flags change only how XLA:CPU turns the HLO
    # program into machine code, so what the tests check (the program's ops,
    # its size, its results) is the same: without LLVM's optimizations it
    # compiles 15% faster, and with the older loop emitters instead of the
    # fusion emitters, up to a quarter less CPU again (three XLA fit and
    # gradient tests, paired runs: 54-59 s -> 40-44 s; tests/layers/
    # test_stacked_weights.py: 84 -> 66-88 s, within this machine's noise).
    os.environ.setdefault(
        "XLA_FLAGS",
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")


_test_process_settings()

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
# busy worker and idle ones. So the long modules are dealt out first, whole
# modules round the workers, at the head of each worker's share: a module
# split over workers builds its module-scoped fixtures (exports, served
# models, compiled steps) once in each of them.
LONG_MODULES = (
    "test_examples.py", "test_multiworker.py", "test_serve_load.py", "test_export.py",
    "test_distribute.py", "test_quantization.py", "test_calibrated_quantization.py",
    "test_drop_in.py", "test_resume.py", "test_bad_ids.py", "test_reversible_sequence.py",
    "test_stacked_weights.py", "test_transformers_reformer.py", "test_fused_ffn_backward.py",
    "test_tokenizers.py",
)


def _deal_long_tests_first(items, workers):
    modules = {}  # long module -> its items, in collection order
    for item in items:
        if item.path.name in LONG_MODULES:
            modules.setdefault(item.path, []).append(item)
    short = [i for i in items if i.path.name not in LONG_MODULES]
    shares = [[] for _ in range(workers)]
    for k, module_items in enumerate(modules.values()):
        shares[k % workers] += module_items
    # The scheduler (worksteal) hands worker k the next
    # `remaining // (workers - k)` items; each share is filled with short
    # tests to exactly that size, so the shares are what the workers get.
    ordered, remaining = [], len(items)
    for k in range(workers):
        size = remaining // (workers - k)
        fill = max(0, size - len(shares[k])) if k < workers - 1 else len(short)
        ordered += shares[k] + short[:fill]
        short = short[fill:]
        remaining -= size
    return ordered


def _no_op_tracebacks():
    """TensorFlow records the Python stack of every graph op it creates, for
    the "defined at" part of its error messages. Under pytest's deep stacks
    that walk was 6% of the suite's CPU (py-spy, whole default run); no test
    reads those traces, and results do not depend on them.
    `KERAS_REFORMER_TEST_OP_TRACEBACKS=1` keeps them, for debugging a
    failure inside a traced function."""
    if os.environ.get("KERAS_REFORMER_TEST_OP_TRACEBACKS") == "1":
        return
    import functools
    import inspect

    from tensorflow.python.framework import ops

    create = ops._create_c_op
    if "extract_traceback" in inspect.signature(create).parameters:
        ops._create_c_op = functools.partial(create, extract_traceback=False)


def pytest_configure(config):
    xdist_controller = (getattr(config, "workerinput", None) is None
                        and config.getoption("numprocesses", None) not in (None, 0))
    if not xdist_controller:  # the controller runs no test: no TensorFlow there
        _no_op_tracebacks()


def pytest_collection_finish(session):
    """Everything imported by now (TensorFlow, Keras, the test modules) lives
    until the end: moved out of the collector's reach, it is not scanned
    again at every full collection of a heap that tracing keeps growing."""
    gc.freeze()


@pytest.hookimpl(trylast=True)  # after `-m` has deselected the slow tests
def pytest_collection_modifyitems(config, items):
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and workers > 1:
        items[:] = _deal_long_tests_first(items, workers)
