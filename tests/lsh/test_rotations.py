"""The inference rotations' generator is identical in eager, graph and XLA."""

import numpy as np
import tensorflow as tf

from keras_reformer.lsh.rotations import deterministic_normal


def test_same_numbers_in_every_mode():
    seed = tf.constant([5, 9], tf.int32)
    eager = deterministic_normal([16, 3, 40], seed).numpy()
    graph = tf.function(deterministic_normal)([16, 3, 40], seed).numpy()
    jit = tf.function(deterministic_normal, jit_compile=True)([16, 3, 40], seed).numpy()
    np.testing.assert_array_equal(eager, graph)
    np.testing.assert_array_equal(eager, jit)


def test_dynamic_shape_in_graph():
    fn = tf.function(
        deterministic_normal,
        input_signature=[tf.TensorSpec([3], tf.int32), tf.TensorSpec([2], tf.int32)],
    )
    out = fn(tf.constant([4, 2, 7]), tf.constant([1, 2]))
    np.testing.assert_array_equal(out, deterministic_normal([4, 2, 7], [1, 2]))


def test_roughly_standard_normal_and_seed_dependent():
    a = deterministic_normal([200_000], [1, 0]).numpy()
    b = deterministic_normal([200_000], [2, 0]).numpy()
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    # Tails of a normal: about 4.55% beyond 2 sigma.
    assert abs((np.abs(a) > 2).mean() - 0.0455) < 0.004
    assert np.abs(a - b).mean() > 0.5
