"""XLA training under tf.distribute strategies, and helpers for them.

Keras 3 on TensorFlow compiles `fit`'s whole step with XLA when asked
(`jit_compile=True`; `"auto"` picks it on GPU/TPU). Under `MirroredStrategy`
and `MultiWorkerMirroredStrategy` that fails even for a one-`Dense` model
(keras-team/keras#19005: the optimizer's cross-replica update is compiled
into each replica's program), and `"auto"` silently falls back to no XLA.
`prepare_fit` keeps XLA there: each replica's forward pass, loss and
gradients are one `tf.function(jit_compile=True)`, and the optimizer update
(which all-reduces the gradients) runs after it, outside XLA. It also
applies the workaround for keras-team/keras#20585, without which `fit`
fails before its first step under `MultiWorkerMirroredStrategy`.

Example (two logical CPUs standing in for two GPUs):

```python
import keras, tensorflow as tf
import keras_reformer as kr
from keras_reformer import distribute

distribute.use_logical_cpus(2)          # before any TensorFlow op
strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
        vocabulary_size=256, num_layers=2, hidden_dim=64,
        max_sequence_length=256))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    distribute.prepare_fit(model)         # per-replica XLA step
model.fit(dataset, epochs=1)
```

See docs/distributed.md for the commands (several hosts, TPU VM) and what
is tested where.
"""

import hashlib
import json
import os

import keras
import tensorflow as tf

from keras_reformer import _checks, _multiworker_fix, _spec_build
from keras_reformer.data._token_id_inputs import (
    STEP_CHECKS_IDS,
    check_step_inputs,
    step_vocabulary_size,
)

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


def make_strategy(name, tpu=""):
    """Returns a `tf.distribute.Strategy` by name.

    Create it before any other TensorFlow op runs (MultiWorkerMirroredStrategy
    starts a gRPC server; logical devices cannot change afterwards).

    Args:
        name: one of `"default"` (the current device), `"mirrored"` (all
            local GPUs, or the logical CPUs set by `use_logical_cpus`),
            `"multiworker"` (`MultiWorkerMirroredStrategy`, workers from the
            `TF_CONFIG` environment variable) or `"tpu"`.
        tpu: for `"tpu"`, the TPU name or `grpc://` address (`""`: the
            TPU VM's local TPU). The TPU path follows the TPUStrategy
            conventions and is untested here (no TPU).

    Returns:
        The strategy.
    """
    _checks.one_of("name", name, STRATEGIES)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    # The last of STRATEGIES: "tpu".
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_mirrored(strategy):
    """True for `MirroredStrategy` and `MultiWorkerMirroredStrategy`."""
    return isinstance(
        strategy,
        (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy),
    )


def _is_tpu(strategy):
    return isinstance(strategy, tf.distribute.TPUStrategy) or type(
        strategy
    ).__name__.startswith("TPUStrategy")


def _replica_train_step(model, grads_fn, data, vocabulary_size=None):
    """Keras' `train_step`, with the forward/loss/gradient part in `grads_fn`."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    # Token ids checked here, in the plain graph around the XLA part (XLA
    # drops assertions and clamps bad ids); a no-op where this step is
    # itself compiled (one device, TPU): there the data route checks.
    x = check_step_inputs(vocabulary_size, x)
    loss, y_pred, grads = grads_fn(x, y, sample_weight)
    # Keras' own step logs the loss unscaled: `compute_loss` divided it by
    # the number of replicas so that the summed gradients are the global
    # batch's gradient.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    model._loss_tracker.update_state(loss * replicas, sample_weight=batch)
    # Outside XLA: under mirrored strategies `apply_gradients` all-reduces
    # the gradients and updates every replica's copy (keras#19005 if inside).
    model.optimizer.apply_gradients(zip(grads, model.trainable_weights))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _dense(grad):
    # Keras' Adam squares an IndexedSlices gradient slice by slice, so rows
    # that appear in several slices get a sum of squares instead of the
    # square of the sum; the all-reduce concatenates each replica's slices,
    # which changed Adam's second moment (embeddings) with the number of
    # replicas. A dense gradient is summed first and squared once.
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


def _make_grads_fn(model, jit_compile):
    @tf.function(jit_compile=jit_compile)
    def grads_fn(x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
            scaled = model.optimizer.scale_loss(loss)  # LossScaleOptimizer
        grads = tape.gradient(scaled, model.trainable_weights)
        return loss, y_pred, [_dense(g) for g in grads]

    return grads_fn


def prepare_fit(model, jit_compile=True):
    """Makes `model.fit` train with XLA under the model's strategy.

    Call it after `model.compile(...)`, inside the same `strategy.scope()`.
    It replaces the model's `train_step` by one that computes each
    replica's forward pass, loss and gradients in a
    `tf.function(jit_compile=jit_compile)` and then calls
    `optimizer.apply_gradients` (which all-reduces the gradients under
    mirrored strategies) outside it:

    - `MirroredStrategy`, `MultiWorkerMirroredStrategy`: the outer step is
      a plain graph (`model.jit_compile = False`) and XLA compiles the
      per-replica part; compiling the update too fails (keras#19005).
    - default strategy, `TPUStrategy`: the whole step is compiled
      (`model.jit_compile = jit_compile`; TPU programs are always XLA).

    Losses and weights match a single-device run on the same global batch
    to float tolerance (tests/test_distribute.py, tests/test_multiworker.py).
    Sparse gradients (embeddings) are made dense first: Keras' Adam treats
    duplicate rows of `IndexedSlices` differently from a dense gradient, so
    its result would depend on how the batch is split. As in Keras' own
    step, `clipnorm`/`global_clipnorm` clip each replica's gradients before
    they are summed, and dropout draws per-replica masks, so those two
    differ from a single-device run by design. Under a multi-worker strategy
    it also applies the workaround for keras-team/keras#20585. Under any
    strategy, `fit` and `evaluate` build the model from the data's
    `element_spec` instead of reading a first batch through an iterator they
    then drop, so a seeded `shuffle` gives the same order of examples as on
    one device. Evaluation and prediction keep Keras' steps.

    Token ids (`x`, or `x["token_ids"]`) are checked against the smallest
    `vocabulary_size` of the model's `TokenIdCheck` layers in each
    replica's step, before its XLA part, where that step is a plain graph
    (mirrored strategies): XLA itself drops the check. Where the whole step
    is compiled (default strategy, TPU) the data must be checked before it:
    `ReformerBackbone.fit` and `ReformerCausalLM.fit` do, and
    `keras_reformer.data.check_token_ids` does for a dataset of your own.

    Args:
        model: a compiled `keras.Model` created under the strategy's scope:
            a `kr.models.ReformerCausalLM`, a `kr.models.ReformerBackbone` or
            any model built from these layers.
        jit_compile: `False` runs the same step as a plain graph.

    Returns:
        `model`, changed in place (instance attributes `train_step`, under
        a strategy `_maybe_symbolic_build`, under multi-worker `test_step`).

    Example:

    ```python
    with strategy.scope():
        model = kr.models.ReformerCausalLM(
            kr.models.ReformerBackbone(vocabulary_size=256))
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        kr.distribute.prepare_fit(model)
    model.fit(dataset, epochs=3)
    ```
    """
    _checks.instance("model", model, keras.Model, "a keras.Model")
    if getattr(model, "optimizer", None) is None:  # unset before compile()
        raise ValueError(
            "`model` must be compiled with an optimizer before prepare_fit(model). "
            f"Received: model={model.name!r} with optimizer=None"
        )
    _checks.boolean("jit_compile", jit_compile)
    # Undo an earlier prepare_fit (instance attributes shadowing the class).
    for name in ("train_step", "test_step", "_maybe_symbolic_build",
                 _multiworker_fix.APPLIED, _spec_build.APPLIED, STEP_CHECKS_IDS):
        model.__dict__.pop(name, None)
    strategy = model.distribute_strategy
    grads_fn = _make_grads_fn(model, jit_compile)
    vocabulary_size = step_vocabulary_size(model)  # of its TokenIdChecks, or None
    # An instance attribute shadows Keras' `train_step` for this model only;
    # object.__setattr__ keeps Keras' attribute tracking out of it.
    object.__setattr__(
        model, "train_step",
        lambda data: _replica_train_step(model, grads_fn, data, vocabulary_size),
    )
    if is_mirrored(strategy):
        model.jit_compile = False
        if vocabulary_size is not None:
            # This step's check fails reliably; the models' own fit's tf.data
            # one may be lost in the multi-device iterator (_token_id_inputs).
            object.__setattr__(model, STEP_CHECKS_IDS, True)
    else:
        model.jit_compile = jit_compile or _is_tpu(strategy)
    model.train_function = None
    if _multiworker_fix.needed(strategy):
        _multiworker_fix.apply(model)
    if is_mirrored(strategy) or _is_tpu(strategy):
        # Keras would read (and drop) a first batch under a strategy, which
        # shifts a seeded shuffle by one permutation (see _spec_build.py).
        _spec_build.apply(model)
    return model


def use_logical_cpus(count):
    """Splits the CPU into `count` logical devices, so that
    `MirroredStrategy` has `count` replicas on a CPU-only machine.

    Call it before any TensorFlow op runs (TensorFlow fixes its devices then).

    Args:
        count: number of logical CPUs, >= 1.
    """
    count = _checks.positive_int("count", count)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )


def task_info():
    """`(type, index)` of this process in `TF_CONFIG` (`("worker", 0)` if unset)."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0))


def is_chief():
    """True on the process that should write exports and samples: the
    `chief` task if `TF_CONFIG`'s cluster has one, else worker 0 (or a lone
    process without `TF_CONFIG`)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    if not config:
        return True
    kind, index = task_info()
    if "chief" in config.get("cluster", {}):
        return kind == "chief"
    return kind == "worker" and index == 0


def replica_values(variable):
    """The local per-replica copies of a (possibly mirrored) variable, as tensors."""
    inner = getattr(variable, "value", variable)
    values = getattr(inner, "values", None)
    if values is None:
        values = getattr(variable, "values", None)
    return [tf.convert_to_tensor(v) for v in (values or [inner])]


def replica_copies(model):
    """The fewest local copies any weight of `model` has (1 if not mirrored)."""
    return min(len(replica_values(w)) for w in model.weights)


def replicas_identical(model):
    """True if every weight of `model` holds the same value on every local replica."""
    for weight in model.weights:
        copies = replica_values(weight)
        for other in copies[1:]:
            if not bool(tf.reduce_all(copies[0] == other)):
                return False
    return True


def weights_digest(model):
    """A SHA-256 hex digest of all weights (first local copy), in order:
    equal on workers that hold bit-identical weights."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(replica_values(weight)[0].numpy().tobytes())
    return digest.hexdigest()


def batches_done(backup_dir, steps_per_epoch):
    """Training batches that a `keras.callbacks.BackupAndRestore(backup_dir)`
    checkpoint (saved at epoch ends) covers; 0 without one. A resumed run
    can `dataset.skip()` them to continue the data stream."""
    path = os.path.join(backup_dir, "training_metadata.json")
    try:
        with open(path) as f:
            return int(json.load(f)["epoch"]) * steps_per_epoch
    except (OSError, ValueError, KeyError, TypeError):
        return 0


__all__ = [
    "STRATEGIES", "batches_done", "is_chief", "is_mirrored", "make_strategy",
    "prepare_fit", "replica_copies", "replica_values", "replicas_identical",
    "task_info", "use_logical_cpus", "weights_digest",
]
