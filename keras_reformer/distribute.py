"""tf.distribute strategies for the examples, and what XLA can do under them.

Keras' `fit` with `jit_compile=True` fails under `MirroredStrategy` (and
`MultiWorkerMirroredStrategy`) even for a Dense model (keras-team/keras#19005:
"Trying to access resource ... replica_1 ... from device CPU:0"), and Keras
resolves `jit_compile="auto"` to False under any strategy. So with those
strategies the examples compile the step as a plain graph (no XLA);
`TPUStrategy` always compiles with XLA; the default strategy uses XLA when
asked. See docs/distributed.md.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


def make_strategy(name, tpu=""):
    """A tf.distribute strategy by name.

    - default: the current device.
    - mirrored: all local devices (GPUs, or the logical CPUs you configured).
    - multiworker: MultiWorkerMirroredStrategy; workers from TF_CONFIG.
    - tpu: TPUStrategy on `tpu` (a name or grpc:// address; "" = local).
      Written to the TPUStrategy conventions; untested here (no TPU).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"`strategy` must be one of {STRATEGIES}. Received: {name!r}")


def fit_jit_compile(strategy, requested):
    """The `jit_compile` to give `model.compile` under `strategy`."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True  # TPU programs are always XLA-compiled
    if requested and strategy.num_replicas_in_sync > 1 or requested and isinstance(
        strategy, (tf.distribute.MirroredStrategy,
                   tf.distribute.MultiWorkerMirroredStrategy)
    ):
        print("note: XLA is switched off under this strategy (keras#19005); "
              "see docs/distributed.md")
        return False
    return requested


def is_chief(strategy):
    """True on the worker that should write exports and samples."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    return task.get("type") == "chief" or (
        task.get("type", "worker") == "worker" and task.get("index", 0) == 0
        and "chief" not in config.get("cluster", {})
    )


def use_logical_cpus(count):
    """Split the CPU into `count` logical devices (before any TF op runs),
    so that MirroredStrategy has `count` replicas on a CPU-only machine."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )


def replica_values(variable):
    """The per-replica copies of a (possibly distributed) variable."""
    inner = getattr(variable, "value", variable)
    values = getattr(inner, "values", None)
    if values is None:
        values = getattr(variable, "values", None)
    return [tf.convert_to_tensor(v) for v in (values or [inner])]


def replica_copies(model):
    """The fewest per-replica copies any weight has (1 if not distributed)."""
    return min(len(replica_values(w)) for w in model.weights)


def replicas_identical(model):
    """True if every weight has the same value on every replica."""
    for weight in model.weights:
        copies = replica_values(weight)
        for other in copies[1:]:
            if not bool(tf.reduce_all(copies[0] == other)):
                return False
    return True


def weights_digest(model):
    """A hash of all weights: equal on workers that hold equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(replica_values(weight)[0].numpy().tobytes())
    return digest.hexdigest()

