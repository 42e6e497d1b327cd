"""Works around a Keras 3.15 graph-mode bug in evaluating finite datasets.

Keras 3.15's TensorFlow trainer, without XLA (`jit_compile=False`, the
CPU default of `examples/train_lm.py`), evaluates a finite `tf.data`
dataset of unknown cardinality whose batches have a static batch size by
dividing the summed loss by one step too many: `evaluate` and `fit`'s
`validation_data` report `n / (n + 1)` of the true mean for a model that
has not yet seen the dataset's length. `lm_dataset(..., repeat=False)` is
such a dataset (its windows come from `unbatch`). With the batch size left
unknown in the element spec Keras counts the steps right, so finite
datasets go through `relax_batch_size`. tests/data/test_batch_shape.py has
a test that fails once Keras no longer needs this.
"""

import tensorflow as tf

from keras_reformer.data._elements import map_elements


def needs_relaxing(dataset):
    """True for a finite-or-unknown dataset whose batch size is static."""
    if tf.data.experimental.cardinality(dataset) != tf.data.UNKNOWN_CARDINALITY:
        return False
    leaves = tf.nest.flatten(dataset.element_spec)
    return any(isinstance(s, tf.TensorSpec) and s.shape.rank and s.shape[0] is not None
               for s in leaves)


def relax_batch_size(dataset):
    """`dataset` with the first dimension of every tensor left unknown (same
    values), if `needs_relaxing(dataset)`; otherwise `dataset` itself."""
    if not needs_relaxing(dataset):
        return dataset

    def relax(t):
        if not isinstance(t, tf.Tensor) or not t.shape.rank:
            return t
        return tf.compat.v1.placeholder_with_default(t, [None] + t.shape[1:].as_list())

    return map_elements(dataset, lambda element: tf.nest.map_structure(relax, element))
