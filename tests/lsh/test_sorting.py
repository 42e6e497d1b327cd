"""lsh.sorting.sort_order against a NumPy reference, in eager, graph and XLA.

Under XLA the order comes from sorting the keys alone (`bucket * L +
position`, decoded by arithmetic) and in every mode the inverse comes from a
scatter, not a second sort: both must give exactly the stable argsort by
bucket, with padding moved past the last bucket.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.lsh.sorting import sort_order


def reference(buckets, valid, num_buckets):
    keyed = np.where(valid[:, None, None, :], buckets, num_buckets)
    order = np.argsort(keyed, axis=-1, kind="stable")
    inverse = np.argsort(order, axis=-1, kind="stable")
    sorted_buckets = np.take_along_axis(keyed, order, axis=-1)
    return order, inverse, sorted_buckets


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("length,num_buckets", [(64, 4), (96, 2), (256, 16)])
def test_sort_order_matches_stable_argsort(mode, length, num_buckets):
    rng = np.random.default_rng(length + num_buckets)
    # Few buckets for many positions: many ties, which only the position
    # part of the key breaks.
    buckets = rng.integers(0, num_buckets, size=(2, 3, 2, length)).astype("int32")
    valid = np.ones((2, length), bool)
    valid[1, length - length // 3:] = False  # right padding
    valid[0, 5] = False  # a hole

    def run(b, v):
        return sort_order(b, v, num_buckets)

    if mode != "eager":
        run = tf.function(run, jit_compile=(mode == "xla"))
    order, inverse, sorted_buckets = (t.numpy() for t in run(buckets, valid))
    want = reference(buckets, valid, num_buckets)
    np.testing.assert_array_equal(order, want[0])
    np.testing.assert_array_equal(inverse, want[1])
    np.testing.assert_array_equal(sorted_buckets, want[2])
    assert order.dtype == inverse.dtype == sorted_buckets.dtype == np.int32
