"""Builds a model for `fit`/`evaluate` under a strategy without reading data.

Keras 3.15's TensorFlow trainer, for a model created under a `tf.distribute`
strategy, opens an iterator over the data, takes one batch to build the
metric and loss state (`_maybe_symbolic_build`; only the batch's shapes and
dtypes are used), drops that iterator, and `fit` then opens a second one.
`Dataset.shuffle(seed=...)` (with `reshuffle_each_iteration=True`, its
default) gives every new iterator the next permutation, so a distributed
run trained on another order of examples than a one-device run of the same
seeded pipeline, which opens one iterator: `examples/train_lm.py` on two
workers ended 1.3e-2 (max abs weight) away from one device, while every
number of the step itself matched. The extra batch also filled the whole
input pipeline (a shuffle buffer of long windows) once, for nothing.

`apply(model)` builds from the dataset's `element_spec` instead, so `fit`
opens exactly one iterator under every strategy, as it does on one device.
"""

import tensorflow as tf

APPLIED = "_keras_reformer_spec_build"


def _per_replica_spec(iterator, replicas):
    """The per-replica `TensorSpec`s of the iterator's batches, or None.

    None (keep Keras' way) when the data is not a tf.data pipeline of plain
    tensors, e.g. a user's own `DistributedDataset` or ragged tensors.
    """
    adapter = getattr(iterator, "data_adapter", None)
    if adapter is None:
        return None
    try:
        spec = adapter.get_tf_dataset().element_spec
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None
    leaves = tf.nest.flatten(spec)
    if not leaves or not all(type(s) is tf.TensorSpec for s in leaves):
        return None

    def local(s):
        # The dataset yields global batches; the strategy splits them evenly.
        # State cannot depend on the batch size, so an unknown or uneven one
        # is left unknown.
        dims = s.shape.as_list()
        if dims and dims[0] is not None:
            dims[0] = dims[0] // replicas if dims[0] % replicas == 0 else None
        return tf.TensorSpec(dims, s.dtype)

    return tf.nest.map_structure(local, spec)


def apply(model):
    """Makes `fit`/`evaluate` build `model` from the data's element spec
    (no batch read, no extra iterator). Idempotent; call it last, after any
    other override of `_maybe_symbolic_build`, which stays the fallback."""
    if getattr(model, APPLIED, False):
        return model
    previous = model._maybe_symbolic_build
    replicas = model.distribute_strategy.num_replicas_in_sync

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            spec = _per_replica_spec(iterator, replicas)
            if spec is not None:
                return previous(data_batch=spec)
        return previous(iterator=iterator, data_batch=data_batch)

    # An instance attribute shadows the class's method for this model only;
    # object.__setattr__ keeps Keras' attribute tracking out of it.
    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)
    object.__setattr__(model, APPLIED, True)
    return model
