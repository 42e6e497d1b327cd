"""ops/recompute.py: the helpers change no values and do what they promise."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.ops import recompute


@pytest.mark.parametrize("first,want", [(3.0, 0.0), (-np.inf, 0.0), (np.nan, np.nan)])
def test_dependency_zero(first, want):
    grad = tf.constant([first, 1.0, 2.0])
    value = float(tf.function(recompute.dependency_zero)(grad))
    np.testing.assert_equal(value, want)


def test_gradient_dependency_and_barrier_keep_values_under_xla():
    x = tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3))
    ids = tf.constant([1, 2, 3])
    grad = tf.constant([0.5, -1.0])

    @tf.function(jit_compile=True)
    def both(x, ids, grad):
        assert recompute.in_xla_context()
        a, b = recompute.gradient_dependency([x, ids], grad)
        return recompute.barrier([a, b])

    out = both(x, ids, grad)
    np.testing.assert_array_equal(out[0], x)
    np.testing.assert_array_equal(out[1], ids)
    # The barrier is a loop XLA keeps; without XLA it is not there at all.
    hlo = both.experimental_get_compiler_ir(x, ids, grad)(stage="optimized_hlo")
    assert " while(" in hlo
    assert not recompute.in_xla_context()


def test_stop_recording_hides_ops_from_the_tape():
    x = tf.Variable(2.0)
    with tf.GradientTape(persistent=True) as tape:
        with recompute.stop_recording():
            hidden = x * x
        seen = x * x
    assert tape.gradient(hidden, x) is None
    assert float(tape.gradient(seen, x)) == 4.0


def test_seed_states_and_snapshot_replay_dropout():
    layer = keras.Sequential([keras.layers.Dense(4), keras.layers.Dropout(0.5, seed=1)])
    x = tf.ones((3, 4))
    layer(x)
    states = recompute.seed_state_variables(layer)
    assert len(states) == 1 and "seed_generator" in states[0].name
    saved = recompute.snapshot(states)
    first = layer(x, training=True)
    assert not np.array_equal(layer(x, training=True), first)  # state moved on
    with keras.StatelessScope(state_mapping=list(zip(states, saved))):
        replay = layer(x, training=True)
    np.testing.assert_array_equal(replay, first)
