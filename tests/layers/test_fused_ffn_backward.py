"""The reversible backward's fused FFN pass (`value_and_vjp`) against autodiff.

When ReversibleSequence's backward recomputes a FeedForwardBlock (or a bare
ChunkedFeedForward) it takes the block's output and VJP in one pass over the
FFN's slices instead of rerunning the block under a tape (whose chunked
gradient would run every slice's forward once more). These tests compare its
gradients with plain autodiff of the same blocks (`reversible=False`) and
with the generic tape path (`_fused_vjp.disabled()`), with dropout replayed,
looped and unrolled, in graph mode and under XLA, and check that the fused
path is taken at all: the FFN's forward runs twice per step, not three times.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ChunkedFeedForward, ReversibleSequence, _fused_vjp
from keras_reformer.layers.reformer_blocks import FeedForwardBlock
from keras_reformer.models import ReformerBackbone, ReformerCausalLM

FEATURES, CHUNK, LENGTH = 8, 8, 20  # 20 = 2.5 slices: the last one is ragged
CALLS = {"ffn": 0}


def counted_gelu(x):
    """gelu that counts its calls: one per FFN slice forward (eagerly, per
    run; in a traced function, per trace)."""
    CALLS["ffn"] += 1
    return keras.activations.gelu(x)


@pytest.fixture(autouse=True)
def fixed_initial_weights():
    keras.utils.set_random_seed(77)


class DenseBlock(keras.layers.Layer):
    """A user's F (no `value_and_vjp`): Dense -> tanh -> Dropout."""

    def __init__(self, seed=0, dropout=0.2, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.rate = seed, dropout
        self.dense = keras.layers.Dense(FEATURES, activation="tanh",
                                        dtype=self.dtype_policy)
        self.drop = keras.layers.Dropout(dropout, seed=seed, dtype=self.dtype_policy)

    def call(self, x, training=None):
        return self.drop(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, "dropout": self.rate}


def stack_of(depth=2, loop="auto", dropout=0.2, dtype=None, activation="gelu",
             ffn=FeedForwardBlock, reversible=True):
    blocks = [
        (DenseBlock(seed=10 * i, dropout=dropout, dtype=dtype),
         ffn(16, chunk_size=CHUNK, activation=activation, dropout=dropout,
             seed=10 * i + 5, dtype=dtype))
        for i in range(depth)
    ]
    # Per-block weights in both: the two sequences share the blocks, and
    # the gradients are compared variable by variable.
    stack = ReversibleSequence(blocks, loop_blocks=loop, dtype=dtype,
                               stack_weights=False)
    stack.build([(None, None, FEATURES)] * 2)
    plain = ReversibleSequence(blocks, reversible=False, dtype=dtype,
                               stack_weights=False)
    plain.build([(None, None, FEATURES)] * 2)
    return stack, plain


def seed_states(layer):
    return [v for v in layer.variables if v.path.endswith("seed_generator_state")]


def gradient_fn(layer, mode, training=True):
    weights = layer.trainable_variables

    def fn(x1, x2):
        with tf.GradientTape() as tape:
            tape.watch([x1, x2])
            y1, y2 = layer([x1, x2], training=training)
            y1, y2 = tf.cast(y1, tf.float32), tf.cast(y2, tf.float32)
            w = tf.cos(tf.range(LENGTH * FEATURES, dtype=tf.float32))
            loss = tf.reduce_sum(y1 * tf.reshape(w, (1, LENGTH, FEATURES)))
            loss += tf.reduce_sum(tf.sin(y2) * y1)
        return [loss] + tape.gradient(loss, [x1, x2] + weights)

    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "jit"))


def run(layer, mode, fused=True, training=True):
    """Gradients from the same seed states every time (reset after)."""
    states = seed_states(layer)
    saved = [v.numpy() for v in states]
    rng = np.random.default_rng(3)
    x1, x2 = (tf.constant(rng.normal(size=(2, LENGTH, FEATURES)).astype("float32"))
              for _ in range(2))
    try:
        if fused:
            return gradient_fn(layer, mode, training)(x1, x2)
        with _fused_vjp.disabled():  # traced (or run eagerly) inside
            return gradient_fn(layer, mode, training)(x1, x2)
    finally:
        for v, value in zip(states, saved):
            v.assign(value)


def assert_all_close(actual, expected, rtol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, f"gradient {i} is None"
        a = np.asarray(tf.cast(a, tf.float32))
        e = np.asarray(tf.cast(e, tf.float32))
        err = np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-6)
        assert err <= rtol, f"gradient {i}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("mode,loop", [
    ("eager", "auto"), ("graph", "auto"), ("graph", False),
    ("jit", "auto"),
    # Unrolled under XLA: covered by the graph-mode unrolled case and the
    # looped XLA case in the default run; ~11 s, so only with -m slow.
    pytest.param("jit", False, marks=pytest.mark.slow),
])
def test_gradients_equal_autodiff_with_dropout(mode, loop):
    stack, plain = stack_of(loop=loop)
    assert stack._loops() == (loop == "auto")
    expected = run(plain, mode)
    fused = run(stack, mode)
    assert_all_close(fused, expected, 1e-5)
    # The same seeds through the generic tape path: the same gradients.
    assert_all_close(fused, run(stack, mode, fused=False), 1e-5)
    # Dropout was on (else the replay would go untested).
    with pytest.raises(AssertionError):
        assert_all_close(run(plain, mode, training=False), expected, 1e-3)


@pytest.mark.parametrize("loop", ["auto", False])
def test_fused_path_is_taken(loop):
    """Counted eagerly (a Python loop per slice): slices x blocks FFN slice
    forwards for the forward pass, as many again for the fused backward;
    the generic tape path runs them once more (its chunked gradient)."""
    depth, slices = 2, -(-LENGTH // CHUNK)
    stack, _ = stack_of(depth, loop=loop, activation=counted_gelu)
    counts = {}
    for fused in (True, False):
        CALLS["ffn"] = 0
        run(stack, "eager", fused=fused)
        counts[fused] = CALLS["ffn"]
    assert counts == {True: 2 * depth * slices, False: 3 * depth * slices}


@pytest.mark.parametrize("mode", ["graph", "jit"])
def test_fused_path_is_taken_when_traced(mode):
    """In a traced step each FFN loop is traced once (first slice + loop
    body): looped, 2 traces for the forward and 2 for the fused backward,
    against 4 for the tape path's recomputation and chunked gradient."""
    stack, _ = stack_of(2, loop="auto", activation=counted_gelu)
    counts = {}
    for fused in (True, False):
        CALLS["ffn"] = 0
        run(stack, mode, fused=fused)
        counts[fused] = CALLS["ffn"]
    assert counts == {True: 4, False: 6}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    stack, plain = stack_of(1, dtype=policy)
    fused = run(stack, "graph")
    for g in fused:
        assert np.isfinite(np.asarray(tf.cast(g, tf.float32))).all()
    assert_all_close(fused, run(plain, "graph"), 2e-2)
    assert_all_close(fused, run(stack, "graph", fused=False), 2e-2)


@pytest.mark.parametrize("chunk_size", [CHUNK, None])
def test_bare_chunked_feed_forward_block(chunk_size):
    """ChunkedFeedForward as a block offers the fused pass too (chunk_size
    None: nothing to fuse, its output goes through the tape)."""
    def ffn(units, dropout, seed, dtype, **_):
        return ChunkedFeedForward(units, chunk_size=chunk_size, dropout=dropout,
                                  seed=seed, dtype=dtype)

    stack, plain = stack_of(ffn=ffn)
    assert _fused_vjp.method_of(stack.g_layers[0]) is not None
    assert_all_close(run(stack, "graph"), run(plain, "graph"), 1e-5)


class ChangedFeedForwardBlock(FeedForwardBlock):
    """Inherits `value_and_vjp` but computes something else."""

    def call(self, inputs, training=None):
        return 2.0 * super().call(inputs, training=training)


def test_block_that_changes_call_goes_through_the_tape():
    stack, plain = stack_of(ffn=ChangedFeedForwardBlock)
    assert _fused_vjp.method_of(stack.g_layers[0]) is None
    assert _fused_vjp.method_of(FeedForwardBlock(4)) is not None
    assert_all_close(run(stack, "graph"), run(plain, "graph"), 1e-5)


def test_reformer_model_gradients_equal_plain_autodiff_graph():
    """The model's own blocks, looped (2 layers), dropout on, 37 positions
    (not a multiple of the FFN's 8-position slices)."""
    config = dict(vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
                  intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
                  num_hashes=2, max_sequence_length=64, seed=3, dropout=0.2,
                  attention_dropout=0.2)
    reversible = ReformerCausalLM(ReformerBackbone(**config, reversible=True))
    plain = ReformerCausalLM(ReformerBackbone(**config, reversible=False))
    plain.set_weights(reversible.get_weights())
    assert reversible.backbone.reversible_stack._loops()
    ids = np.random.default_rng(0).integers(1, 40, size=(2, 37)).astype("int32")
    inputs = {"token_ids": tf.constant(ids),
              "padding_mask": tf.constant(np.ones_like(ids))}
    labels = tf.constant(np.roll(ids, -1, axis=1))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def grads_of(model):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(labels, model(inputs, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            return [loss] + [tf.convert_to_tensor(g) for g in grads]
        return step()

    assert_all_close(grads_of(reversible), grads_of(plain), 1e-4)
