"""LSH attention and the LM in half precision (mixed_float16, mixed_bfloat16).

The extremes of the attention's masks: every query's bucket holding only
itself (its only key is its own, which carries SELF_MASK_VALUE = -1e5, below
float16's range of +-65504) or only padding (every key masked, MASK_VALUE =
-1e9). The attention's logits, masks and logsumexp are float32 under any
policy (LSHAttention.project casts q, k and v up), so neither overflows; these
tests hold that: outputs and gradients are finite and equal the float32
layer's within the half dtype's rounding.

The slow test is a training step of a small-width ReformerCausalLM at 64K
tokens under each policy: a finite loss and finite gradients, the loss
within LOSS_RTOL of the float32 step's.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.lsh.test_lsh_attention import inputs, make_layer

POLICIES = ["mixed_float16", "mixed_bfloat16"]
# Largest absolute difference to float32, as a fraction of the float32
# tensor's largest absolute value (gradients: of the weights' and input's,
# the worst; a gradient below 1e-3 of the largest counts against 1e-3 of the
# largest: where a query sees only itself the output does not depend on the
# qk projection, whose float32 gradient is rounding noise of ~1e-6).
# Measured at length 256 (2 heads, key_dim 8, 8 buckets), worst of the six
# extremes: outputs float16 6e-4, bfloat16 5.4e-3; gradients float16 2.3e-3,
# bfloat16 3.6e-2 (the output bias's gradient, a sum of 512 bfloat16
# cotangents). These are the half dtypes' rounding (float16 keeps 11
# significant bits, bfloat16 8) in the projections around the float32 core.
OUTPUT_TOLERANCE = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.5e-2}
GRADIENT_TOLERANCE = {"mixed_float16": 6e-3, "mixed_bfloat16": 6e-2}
LENGTH = 256


def as_policy(policy, build):
    """`build()` with `policy` as Keras' global dtype policy."""
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy("float32")


def output_and_grads(layer, x, **call):
    """The layer's output and the gradients of a fixed weighted sum of it
    with respect to the input and every weight, all float32 numpy."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = tf.cast(layer(x, **call), tf.float32)
        cotangent = tf.constant(np.random.default_rng(1).normal(size=out.shape), tf.float32)
        total = tf.reduce_sum(out * cotangent)
    grads = tape.gradient(total, [x] + layer.trainable_weights)
    return [np.asarray(tf.cast(t, tf.float32)) for t in [out] + grads]


def worst_error(got, want):
    """max |got - want| / max |want| over the tensors; a tensor whose max
    |want| is below 1e-3 of the largest is measured against that 1e-3."""
    floor = 1e-3 * max(np.abs(w).max() for w in want)
    return max(float(np.abs(g - w).max() / max(np.abs(w).max(), floor))
               for g, w in zip(got, want))


def extremes():
    """(name, layer settings, call arguments): every query's bucket holding
    only itself, or only padding."""
    alone = np.zeros((2, LENGTH), bool)
    alone[0, 0] = alone[1, LENGTH // 2] = True  # one real token per row
    return [
        # Each query sees only its own key, in every round: its logsumexp
        # is its own logit plus SELF_MASK_VALUE.
        ("only_itself_causal", dict(sliding_window=1), dict(use_causal_mask=True)),
        ("only_itself", dict(sliding_window=1), {}),
        # One real token per row: its bucket holds only itself, every other
        # query is padding whose bucket holds only padding.
        ("one_token_causal", {}, dict(use_causal_mask=True, query_mask=alone)),
        ("one_token", {}, dict(query_mask=alone)),
        # All padding: every key of every query masked.
        ("only_padding_causal", {}, dict(use_causal_mask=True,
                                         query_mask=np.zeros((2, LENGTH), bool))),
        ("only_padding", {}, dict(query_mask=np.zeros((2, LENGTH), bool))),
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name, settings, call", extremes(), ids=[e[0] for e in extremes()])
def test_mask_extremes_are_finite_and_match_float32(policy, name, settings, call):
    # Fixed initial weights: float16's gradient error has a tail over random
    # draws (up to 3.9e-3 over 8 seeds, once 6.9e-3 in a default run).
    keras.utils.set_random_seed(0)
    x = inputs(2, LENGTH)
    reference = make_layer(num_buckets=8, **settings)
    want = output_and_grads(reference, x, **call)
    layer = as_policy(policy, lambda: make_layer(num_buckets=8, **settings))
    layer.set_weights(reference.get_weights())
    got = output_and_grads(layer, x, **call)
    assert layer.compute_dtype == policy.split("_")[1]
    for tensor in got:
        assert np.all(np.isfinite(tensor)), name
    output_error, gradient_error = worst_error(got[:1], want[:1]), worst_error(got[1:], want[1:])
    assert output_error < OUTPUT_TOLERANCE[policy], (name, output_error)
    assert gradient_error < GRADIENT_TOLERANCE[policy], (name, gradient_error)


def test_half_precision_would_overflow_the_masks():
    # Why the core stays float32: the mask values do not fit in float16
    # (bfloat16 has float32's range), so a float16 logsumexp of a fully
    # masked row would be -inf and its softmax NaN.
    from keras_reformer.lsh.scores import MASK_VALUE, SELF_MASK_VALUE

    assert np.isinf(np.float16(SELF_MASK_VALUE)) and np.isinf(np.float16(MASK_VALUE))
    for dtype, finite in ((tf.float16, False), (tf.float32, True)):
        row = tf.constant([MASK_VALUE, MASK_VALUE], dtype)
        assert np.isfinite(np.asarray(tf.nn.softmax(row))).all() == finite, dtype


# --- the slow test: a training step at 64K tokens ---------------------------

LONG = 65536
# Relative to the float32 step: |loss - float32's| / float32's, and the
# gradients' ||g - g32|| / ||g32|| over all weights together (the hash of a
# half-precision qk moves some tokens to another bucket, so the attention
# itself differs a little, not only its rounding). Measured at 64K (2
# layers, width 32, bucket 64; the test prints them with -s): loss 1.2e-5
# (float16) and 6.0e-5 (bfloat16), gradients 0.11 and 0.23; at 2K: loss
# 3.4e-4 and 3.8e-5, gradients 0.06 and 0.15.
LOSS_RTOL = {"mixed_float16": 2e-3, "mixed_bfloat16": 2e-3}
GRADIENT_RTOL = {"mixed_float16": 0.2, "mixed_bfloat16": 0.4}


def relative_norm(got, want):
    """||got - want|| / ||want||, all tensors as one vector."""
    diff = np.sqrt(sum(np.sum(np.square(g - w)) for g, w in zip(got, want)))
    return float(diff / np.sqrt(sum(np.sum(np.square(w)) for w in want)))


def training_step(policy, weights=None):
    """Loss, gradients and weights of one step of a small-width
    ReformerCausalLM at LONG tokens under `policy`, from `weights` (those of
    another run: the weights and the seed generators' states, so the same
    training rotations) if given."""
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    def build():
        backbone = ReformerBackbone(
            vocabulary_size=258, num_layers=2, hidden_dim=32, num_heads=2,
            intermediate_dim=64, bucket_size=64, max_sequence_length=LONG, seed=0)
        return ReformerCausalLM(backbone)

    lm = as_policy(policy, build)
    if weights is not None:
        lm.set_weights(weights)
    weights = lm.get_weights()
    ids = np.random.default_rng(0).integers(0, 256, (1, LONG + 1)).astype("int32")
    inputs = {"token_ids": tf.constant(ids[:, :-1]),
              "padding_mask": tf.ones((1, LONG), tf.int32)}
    labels = tf.constant(ids[:, 1:])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = tf.cast(lm(inputs, training=True), tf.float32)
            loss = loss_fn(labels, logits)
        return loss, tape.gradient(loss, lm.trainable_variables)

    loss, grads = step()
    return float(loss), [np.asarray(tf.convert_to_tensor(g)) for g in grads], weights


@pytest.mark.slow
def test_training_step_at_64k_in_half_precision():
    want, want_grads, weights = training_step("float32")
    for policy in POLICIES:
        loss, grads, _ = training_step(policy, weights)
        assert np.isfinite(loss), policy
        assert all(np.all(np.isfinite(g)) for g in grads), policy
        assert len(grads) == len(want_grads)
        error, gradient_error = abs(loss - want) / want, relative_norm(grads, want_grads)
        print(f"\n{policy} at {LONG}: loss {loss:.5f} (float32 {want:.5f}, relative "
              f"difference {error:.1e}), gradients' relative difference "
              f"{gradient_error:.1e}")
        assert error < LOSS_RTOL[policy], (policy, loss, want)
        assert gradient_error < GRADIENT_RTOL[policy], (policy, gradient_error)
