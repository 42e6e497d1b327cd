"""The reference rules' loop over groups of heads (bounded memory at long
lengths) against every head at once: the same outputs, and gradients equal
to autodiff through a plain Python loop over the groups."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.lsh import hashing, reference_rules

B, H, L, D, E, R, CHUNK = 2, 4, 32, 8, 6, 2, 4
FACTORS = (4,)
PER_HEAD = R * L * 2 * CHUNK  # scores per head (one chunk before)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    qk = tf.constant(rng.normal(size=(B, H, L, D)), tf.float32)
    v = tf.constant(rng.normal(size=(B, H, L, E)), tf.float32)
    rotations = tf.constant(rng.normal(size=(H, D, R, sum(FACTORS) // 2)), tf.float32)
    valid = tf.constant(np.arange(L)[None] < np.array([[L], [L - 7]]))
    buckets = hashing.hash_per_head(qk, rotations, FACTORS)
    return qk, v, valid, buckets


def run(qk, v, valid, buckets, group_elements, rate=0.0, seed=None):
    return reference_rules.attend_hashed(
        qk, v, valid, buckets, 4, CHUNK, 1, 0, True, rate, seed,
        group_elements=group_elements)


@pytest.mark.parametrize("heads_per_group", [1, 2])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_loop_equals_every_head_at_once(heads_per_group, mode):
    qk, v, valid, buckets = inputs()
    whole = reference_rules.attend_heads(qk, v, valid, buckets, 4, CHUNK, 1, 0, True)

    def looped(qk, v):
        with tf.GradientTape() as tape:
            tape.watch([qk, v])
            out = run(qk, v, valid, buckets, heads_per_group * PER_HEAD)
            loss = tf.reduce_sum(out * tf.sin(out))
        return out, tape.gradient(loss, [qk, v])

    def at_once(qk, v):
        with tf.GradientTape() as tape:
            tape.watch([qk, v])
            out = reference_rules.attend_heads(qk, v, valid, buckets, 4, CHUNK, 1, 0, True)
            loss = tf.reduce_sum(out * tf.sin(out))
        return out, tape.gradient(loss, [qk, v])

    if mode != "eager":
        looped = tf.function(looped, jit_compile=mode == "xla")
    out, grads = looped(qk, v)
    want, want_grads = at_once(qk, v)
    np.testing.assert_allclose(out, whole, atol=1e-5)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_loop_with_dropout_matches_a_plain_loop_over_groups():
    # Each group draws its dropout from the seed folded with its index; the
    # custom gradient (recomputing each group) must equal autodiff through
    # the same groups written as a Python loop.
    qk, v, valid, buckets = inputs(1)
    seed = tf.constant([3, 9], tf.int32)

    def reference(qk, v):
        outs = []
        for i in range(H):
            s = slice(i, i + 1)
            outs.append(reference_rules.attend_heads(
                qk[:, s], v[:, s], valid, buckets[:, s], 4, CHUNK, 1, 0, True,
                0.3, seed + tf.constant([0, i])))
        return tf.concat(outs, 1)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([qk, v])
            out = fn(qk, v)
            loss = tf.reduce_sum(out * tf.cos(out))
        return out, tape.gradient(loss, [qk, v])

    out, got = grads(lambda q, w: run(q, w, valid, buckets, PER_HEAD, 0.3, seed))
    want_out, want = grads(reference)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)
    # The dropout is on: without it the outputs differ.
    assert np.abs(out - run(qk, v, valid, buckets, PER_HEAD)).max() > 1e-2
