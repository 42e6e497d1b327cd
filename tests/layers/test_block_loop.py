"""ReversibleSequence(loop_blocks=...): identical blocks as one loop body.

The loop's results are checked against plain autodiff in
test_reversible_sequence.py (its gradient tests run both paths); these tests
check what the loop is for (a program that does not grow with depth) and its
arguments.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ChunkedFeedForward, ReversibleSequence
from tests.layers.blocks import AttentionBlock

FEATURES = 8


def stack_of(depth, loop, ffn_dim=16):
    keras.utils.set_random_seed(0)
    blocks = [(AttentionBlock(seed=i), ChunkedFeedForward(ffn_dim, chunk_size=4, seed=i))
              for i in range(depth)]
    # The loop over each block's own variables ("auto" would stack them:
    # tests/layers/test_stacked_weights.py).
    stack = ReversibleSequence(blocks, loop_blocks=loop, stack_weights=False)
    stack.build([(None, None, FEATURES)] * 2)
    return stack


def graph_nodes(stack):
    """Nodes of a training step's graph, the functions it calls included."""
    x = tf.zeros((1, 16, FEATURES))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y1, y2 = stack([x, x], training=True)
            loss = tf.reduce_sum(y1) + tf.reduce_sum(y2)
        return tape.gradient(loss, stack.trainable_variables)

    graph = step.get_concrete_function(x).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


@pytest.mark.slow  # ~16 s; the default layout's (stacked) is test_stacked_weights::test_xla_program_does_not_grow_with_depth
def test_program_does_not_grow_with_depth():
    unrolled = [graph_nodes(stack_of(d, False)) for d in (2, 4)]
    looped = [graph_nodes(stack_of(d, True)) for d in (2, 4)]
    per_block_unrolled = (unrolled[1] - unrolled[0]) / 2
    per_block_looped = (looped[1] - looped[0]) / 2
    variables = len(stack_of(1, False).variables)
    print(f"nodes per block: unrolled {per_block_unrolled}, looped {per_block_looped}"
          f" ({variables} variables per block)")
    # Looped, a block adds only the reads of its variables, their writes into
    # the forward's and the backward's TensorArrays and the reads of its
    # gradients (about 12.4 nodes per variable); unrolled, it adds its whole
    # forward and backward program (13x as much).
    assert per_block_looped <= 14 * variables
    assert per_block_unrolled > 10 * per_block_looped


def test_auto_loops_only_identical_blocks():
    stack = stack_of(3, "auto")
    assert stack._loops()
    different = [(AttentionBlock(), ChunkedFeedForward(16, chunk_size=4)),
                 (AttentionBlock(), ChunkedFeedForward(32, chunk_size=4))]
    assert not ReversibleSequence(different)._loops()
    assert not stack_of(1, "auto")._loops()
    shared = AttentionBlock()
    assert not ReversibleSequence(
        [(shared, ChunkedFeedForward(16)), (shared, ChunkedFeedForward(16))]
    )._loops()


def test_loop_true_refuses_different_blocks():
    different = [(AttentionBlock(), ChunkedFeedForward(16, chunk_size=4)),
                 (AttentionBlock(), ChunkedFeedForward(32, chunk_size=4))]
    stack = ReversibleSequence(different, loop_blocks=True)
    x = tf.zeros((1, 8, FEATURES))
    with pytest.raises(ValueError, match="block 1's `g`.*differs"):
        stack([x, x])


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_loop_blocks_must_be_auto_or_bool(value):
    with pytest.raises(ValueError, match=r"`loop_blocks` must be one of .*Received: loop_blocks="):
        ReversibleSequence([(AttentionBlock(), AttentionBlock())], loop_blocks=value)


def test_seed_states_advance_as_unrolled():
    """After a training call every block's generators moved as unrolled."""
    x = tf.random.normal((1, 16, FEATURES), seed=1)
    states = []
    for loop in (False, True):
        stack = stack_of(3, loop)
        stack([x, x], training=True)
        states.append([v.numpy() for v in stack.non_trainable_variables])
    for a, b in zip(*states):
        np.testing.assert_array_equal(a, b)
    # And they did move (else the check above would be empty).
    fresh = [v.numpy() for v in stack_of(3, True).non_trainable_variables]
    assert any((a != b).any() for a, b in zip(fresh, states[1]))
