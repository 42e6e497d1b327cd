"""ops.buffers: rows written into a copy or in place."""

import numpy as np
import tensorflow as tf

from keras_reformer.ops import buffers


def test_set_rows_in_place_and_copying_agree():
    buffer = tf.reshape(tf.range(24, dtype=tf.float32), [2, 3, 4])
    rows = tf.constant([0, 5])
    updates = tf.constant([[-1.0] * 4, [-2.0] * 4])
    expected = buffer.numpy().reshape(6, 4)
    expected[[0, 5]] = updates.numpy()
    copied = buffers.set_rows(buffer, rows, updates, in_place=False)
    np.testing.assert_array_equal(copied.numpy().reshape(6, 4), expected)
    in_place = tf.function(
        lambda b: buffers.set_rows(buffers.own(b), rows, updates, True))(buffer)
    np.testing.assert_array_equal(in_place.numpy().reshape(6, 4), expected)
    assert buffer.numpy()[0, 0, 0] == 0.0  # `own` copied before overwriting
