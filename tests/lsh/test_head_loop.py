"""LSHAttention's heads one at a time (`keras_reformer.lsh.head_loop`), which
the layer uses for very long inputs: here forced at small sizes by lowering
the threshold."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import LSHAttention
from keras_reformer.lsh import head_loop

FEATURES = 12


@pytest.fixture
def heads_in_turn(monkeypatch):
    """Sets whether the layers run their heads one at a time."""
    def use(on):
        monkeypatch.setattr(head_loop, "HEAD_LOOP_ELEMENTS", 0 if on else 2**62)
    return use


def layer_and_inputs(**kwargs):
    args = dict(num_heads=3, key_dim=8, value_dim=6, bucket_size=8, num_hashes=2, seed=4)
    args.update(kwargs)
    layer = LSHAttention(**args)
    layer.build((None, None, FEATURES))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 64, FEATURES)).astype("float32"))
    mask = tf.constant(np.arange(64)[None] < np.array([[64], [50]]))
    return layer, x, mask


def outputs_and_gradients(layer, x, call_kwargs, mode):
    """The output and the gradients of a weighted sum of it with respect to
    the input and every trainable weight, in `mode`."""
    weights = layer.trainable_variables
    # The layer's random state, so each run draws the same rotations.
    states = [v.numpy() for v in layer.non_trainable_variables]

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **call_kwargs)
            loss = tf.reduce_sum(y * tf.sin(tf.range(y.shape[-1], dtype=tf.float32)))
        return [y] + tape.gradient(loss, [x] + weights)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    got = [np.asarray(t) for t in step(x)]
    for v, value in zip(layer.non_trainable_variables, states):
        v.assign(value)
    return got


def assert_close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        scale = np.abs(b).max() + 1e-12
        assert np.abs(a - b).max() <= tol * scale, (i, np.abs(a - b).max() / scale)


@pytest.mark.parametrize("layer_kwargs, call, mode", [
    ({}, {"use_causal_mask": True}, "graph"),
    ({}, {"use_causal_mask": False}, "eager"),
    ({"use_bias": False}, {"use_causal_mask": True}, "xla"),
    ({"value_shift": True}, {"use_causal_mask": True}, "graph"),
    ({}, {"attention_mask": "random"}, "graph"),
])
def test_equals_all_heads_at_once(heads_in_turn, layer_kwargs, call, mode):
    # Without dropout, both ways compute the same function of the same
    # random rotations: outputs and every gradient agree.
    layer, x, mask = layer_and_inputs(**layer_kwargs)
    call = dict(call, query_mask=mask)
    if call.get("attention_mask") == "random":
        call["attention_mask"] = tf.constant(
            np.random.default_rng(1).random((2, 64, 64)) > 0.3)
    heads_in_turn(False)
    want = outputs_and_gradients(layer, x, call, mode)
    heads_in_turn(True)
    assert layer._heads_in_turn(x)
    got = outputs_and_gradients(layer, x, call, mode)
    assert_close(got, want, 1e-5)


# Graph mode only: the loop under XLA is checked above, without dropout.
@pytest.mark.parametrize("mode", ["graph"])
def test_recomputing_gradient_equals_autodiff_with_dropout(heads_in_turn, monkeypatch,
                                                           mode):
    # The loop's gradient recomputes each head from its seed; the reference
    # is plain autodiff of the same sum written out head by head.
    layer, x, mask = layer_and_inputs(dropout=0.3)
    call = {"use_causal_mask": True, "query_mask": mask}
    heads_in_turn(True)
    got = outputs_and_gradients(layer, x, call, mode)

    def unrolled(head_fn, x, per_head, num_heads, output_dim):
        return sum(tf.cast(head_fn(tf.constant(h), x, *[w[h] for w in per_head]),
                           tf.float32) for h in range(num_heads))

    monkeypatch.setattr(head_loop, "sum_over_heads", unrolled)
    want = outputs_and_gradients(layer, x, call, mode)
    assert_close(got, want, 1e-5)
    # Dropout is on: the heads' masks differ from one another, so the
    # result is not that of attention without dropout.
    layer.dropout = 0.0
    plain = outputs_and_gradients(layer, x, call, mode)
    assert np.abs(plain[0] - got[0]).max() > 1e-2


def test_used_only_for_long_inputs_and_plain_kernels():
    # (3 heads x 8 wide: the default threshold is crossed above 2^24 / 24.)
    layer, _, _ = layer_and_inputs()
    assert not layer._heads_in_turn(tf.zeros((1, 4096, FEATURES)))
    assert layer._heads_in_turn(keras.KerasTensor((1, 2**20, FEATURES)))
    assert not layer._heads_in_turn(keras.KerasTensor((1, None, FEATURES)))
    gated, _, _ = layer_and_inputs(use_gate=True)
    assert not gated._heads_in_turn(keras.KerasTensor((1, 2**20, FEATURES)))


def test_each_head_draws_its_own_dropout_mask(heads_in_turn):
    # Heads with identical weights differ only through their dropout masks:
    # the output through head 0 alone and through head 1 alone must differ.
    layer, x, mask = layer_and_inputs(dropout=0.5)
    heads_in_turn(True)
    for dense in (layer.qk_dense, layer.value_dense):
        kernel = dense.kernel.numpy()
        dense.kernel.assign(np.repeat(kernel[:, :1], 3, axis=1))
    out_kernel = layer.output_dense.kernel.numpy()
    call = {"use_causal_mask": True, "query_mask": mask}
    through = []
    for head in (0, 1):
        alone = np.zeros_like(out_kernel)
        alone[head] = out_kernel[0]
        layer.output_dense.kernel.assign(alone)
        through.append(outputs_and_gradients(layer, x, call, "graph")[0])
    assert np.abs(through[0] - through[1]).max() > 1e-3
    # ... and without dropout they are the same.
    layer.dropout = 0.0
    for head in (0, 1):
        alone = np.zeros_like(out_kernel)
        alone[head] = out_kernel[0]
        layer.output_dense.kernel.assign(alone)
        through[head] = outputs_and_gradients(layer, x, call, "graph")[0]
    np.testing.assert_allclose(through[0], through[1], atol=1e-6)


def test_backbone_with_stacked_weights_equals_all_heads_at_once(heads_in_turn):
    # The layout the backbone uses by default (one loop body reading block
    # i's weights): loss and every gradient as with all heads at once.
    from keras_reformer.models import ReformerBackbone, ReformerCausalLM

    lm = ReformerCausalLM(ReformerBackbone(
        vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
        intermediate_dim=32, bucket_size=8, max_sequence_length=64, seed=3))
    ids = tf.constant(np.random.default_rng(2).integers(1, 40, size=(2, 64)), tf.int32)
    x = {"token_ids": ids, "padding_mask": tf.ones_like(ids)}
    states = [v.numpy() for v in lm.non_trainable_variables]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            logits = lm(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                x["token_ids"][:, 1:], logits[:, :-1], from_logits=True))
        grads = tape.gradient(loss, lm.trainable_variables)
        return [loss] + [tf.convert_to_tensor(g) for g in grads]  # (embeddings': sparse)

    results = []
    for on in (False, True):
        heads_in_turn(on)
        for v, value in zip(lm.non_trainable_variables, states):
            v.assign(value)
        results.append([np.asarray(t) for t in step(x)])
        step = tf.function(step.python_function)  # traced afresh
    # (float32 through a reversible stack: agreement to ~2e-5 of each scale)
    assert_close(results[1], results[0], 1e-4)


def test_sum_and_gradient_trace_each_head_once_per_pass():
    # The head's program (all of LSH attention) is traced once for the
    # forward loop and once for the recomputing gradient: a third copy
    # would grow every long-input graph and its XLA compile. The sum and
    # its gradients are checked against the sum written out by hand.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(2, 5, 4)).astype("float32"))
    kernels = tf.constant(rng.normal(size=(3, 4, 6)).astype("float32"))
    traces = []

    def head_fn(h, x, w):
        traces.append(h)
        return tf.tanh(tf.einsum("blf,fo->blo", x, w)) * tf.cast(h + 1, tf.float32)

    @tf.function
    def looped(x, kernels):
        with tf.GradientTape() as tape:
            tape.watch([x, kernels])
            total = head_loop.sum_over_heads(head_fn, x, [kernels], 3, output_dim=6)
            loss = tf.reduce_sum(total * tf.range(6, dtype=tf.float32))
        return total, tape.gradient(loss, [x, kernels])

    total, grads = looped(x, kernels)
    assert len(traces) == 2
    with tf.GradientTape() as tape:
        tape.watch([x, kernels])
        want = sum(tf.tanh(tf.einsum("blf,fo->blo", x, kernels[h])) * (h + 1)
                   for h in range(3))
        loss = tf.reduce_sum(want * tf.range(6, dtype=tf.float32))
    want_grads = tape.gradient(loss, [x, kernels])
    np.testing.assert_allclose(total.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
