"""The reversible backward's fused attention pass (`AttentionBlock.value_and_vjp`).

For inputs so long that LSHAttention runs its heads one at a time, the
reversible backward takes an attention block's output and VJP in one loop
over the heads instead of rerunning the block under a tape (whose head
loop's gradient would run every head's forward once more). The loop is
forced here at small sizes by lowering `head_loop.HEAD_LOOP_ELEMENTS`.

References: plain autodiff of the same blocks (`reversible=False`), the
generic tape path (`_fused_vjp.disabled()`), and, without dropout, all heads
at once (no head loop at all).
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ReversibleSequence, _fused_vjp
from keras_reformer.layers.reformer_blocks import AttentionBlock, FeedForwardBlock
from keras_reformer.lsh import chunk_attention, head_loop
from keras_reformer.lsh.lsh_attention import LSHAttention
from keras_reformer.models import ReformerBackbone, ReformerCausalLM
from tests.layers.test_fused_ffn_backward import (
    FEATURES,
    assert_all_close,
    fixed_initial_weights,  # noqa: F401  (an autouse fixture)
    run,
)


@pytest.fixture
def heads_in_turn(monkeypatch):
    def use(on):
        monkeypatch.setattr(head_loop, "HEAD_LOOP_ELEMENTS", 0 if on else 2**62)
    return use


@pytest.fixture
def small_groups(monkeypatch):
    """Chunk attention in loops of recomputed groups of rows (and of
    chunk ranges within a round), as at 128K tokens: nested loops whose
    gradients run inside each head's tape."""
    settings = chunk_attention.ChunkSettings
    monkeypatch.setattr(chunk_attention, "ChunkSettings",
                        functools.partial(settings, group_elements=16))


@pytest.fixture
def attend_traces(monkeypatch):
    """Counts the traces (graph mode) of one head's attention."""
    calls = {"n": 0}
    original = LSHAttention._own_attend

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LSHAttention, "_own_attend", counted)
    return calls


def stack_of(depth=2, dropout=0.2, attention_type="lsh", dtype=None, **attention):
    if attention_type == "lsh":
        attention = {"bucket_size": 4, "num_hashes": 2, **attention}
    blocks = [
        (AttentionBlock(2, 4, dropout=dropout, attention_dropout=dropout,
                        seed=10 * i, attention_type=attention_type,
                        attention_kwargs=attention, dtype=dtype),
         FeedForwardBlock(16, chunk_size=8, dropout=dropout, seed=10 * i + 5,
                          dtype=dtype))
        for i in range(depth)
    ]
    # Per-block weights in both: the two sequences share the blocks.
    stack = ReversibleSequence(blocks, stack_weights=False, dtype=dtype)
    stack.build([(None, None, FEATURES)] * 2)
    plain = ReversibleSequence(blocks, reversible=False, stack_weights=False,
                               dtype=dtype)
    plain.build([(None, None, FEATURES)] * 2)
    return stack, plain


@pytest.mark.parametrize("mode", [
    "graph",
    # ~20 s; the graph case runs the same fused program.
    pytest.param("jit", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("groups", ["all", "small"])
def test_gradients_equal_autodiff_with_dropout(heads_in_turn, request, mode, groups):
    heads_in_turn(True)
    if groups == "small":
        request.getfixturevalue("small_groups")
    stack, plain = stack_of()
    fused = run(stack, mode)
    assert_all_close(fused, run(plain, mode), 1e-5)
    assert_all_close(fused, run(stack, mode, fused=False), 1e-5)
    # Dropout was on (else the replay would go untested).
    with pytest.raises(AssertionError):
        assert_all_close(run(plain, mode, training=False), fused, 1e-3)


def test_gradients_equal_all_heads_at_once(heads_in_turn):
    # Without dropout the head loop computes what all heads at once do.
    stack, _ = stack_of(dropout=0.0)
    heads_in_turn(False)
    want = run(stack, "graph")
    heads_in_turn(True)
    assert_all_close(run(stack, "graph"), want, 1e-4)


def test_causal_padding_and_value_shift(heads_in_turn):
    # value_shift reads the next position's value: its VJP goes through the
    # shift inside each head.
    heads_in_turn(True)
    stack, plain = stack_of(dropout=0.0, value_shift=True, bucket_size=8)
    assert_all_close(run(stack, "graph"), run(plain, "graph"), 1e-5)


def test_each_head_runs_once_in_the_backward(heads_in_turn, attend_traces):
    """Traced (graph mode, 2 blocks looped: the loop body traced once): one
    trace of a head's attention for the forward pass and one for the fused
    backward, against two for the tape path (the forward rerun, then the
    head loop's recomputing gradient)."""
    heads_in_turn(True)
    stack, _ = stack_of()
    counts = {}
    for fused in (True, False):
        attend_traces["n"] = 0
        run(stack, "graph", fused=fused)
        counts[fused] = attend_traces["n"]
    assert counts == {True: 2, False: 3}


def test_short_inputs_and_local_attention_go_through_the_tape(heads_in_turn,
                                                             attend_traces):
    # Below the threshold (all heads at once) there is nothing to fuse:
    # the attention's forward is rerun under the tape, as without the method.
    heads_in_turn(False)
    stack, plain = stack_of()
    counts = {}
    for fused in (True, False):
        attend_traces["n"] = 0
        got = run(stack, "graph", fused=fused)
        counts[fused] = attend_traces["n"]
    assert counts[True] == counts[False]
    assert_all_close(got, run(plain, "graph"), 1e-5)
    local, local_plain = stack_of(attention_type="local", dropout=0.0,
                                  chunk_length=4)
    # (The key bias's gradient is zero up to round-off, softmax being blind
    # to a shift shared by all keys: compared absolutely, not to its scale.)
    for got, want in zip(run(local, "graph"), run(local_plain, "graph")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_precision(heads_in_turn):
    heads_in_turn(True)
    stack, plain = stack_of(1, dtype="mixed_bfloat16")
    fused = run(stack, "graph")
    for g in fused:
        assert np.isfinite(np.asarray(tf.cast(g, tf.float32))).all()
    assert_all_close(fused, run(plain, "graph"), 3e-2)


def test_backbone_stacked_weights(heads_in_turn):
    """The backbone's default layout (one loop body reading block i's
    weights): the loss's gradients as with the tape path and as with plain
    autodiff of the same blocks."""
    heads_in_turn(True)
    config = dict(vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
                  intermediate_dim=32, bucket_size=8, num_hashes=2,
                  max_sequence_length=64, seed=3, dropout=0.2,
                  attention_dropout=0.2)
    reversible = ReformerCausalLM(ReformerBackbone(**config))
    plain = ReformerCausalLM(ReformerBackbone(**config, reversible=False))
    plain.set_weights(reversible.get_weights())
    ids = np.random.default_rng(0).integers(1, 40, size=(2, 37)).astype("int32")
    inputs = {"token_ids": tf.constant(ids),
              "padding_mask": tf.constant(np.ones_like(ids))}
    labels = tf.constant(np.roll(ids, -1, axis=1))

    def grads_of(model):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                logits = model(inputs, training=True)
                loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                    labels, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
            return [loss] + [tf.convert_to_tensor(g) for g in grads]
        return step()

    states = [v.numpy() for v in reversible.non_trainable_variables]
    fused = grads_of(reversible)
    assert_all_close(fused, grads_of(plain), 1e-4)
    for v, value in zip(reversible.non_trainable_variables, states):
        v.assign(value)  # the same dropout masks again
    with _fused_vjp.disabled():
        assert_all_close(fused, grads_of(reversible), 1e-4)
