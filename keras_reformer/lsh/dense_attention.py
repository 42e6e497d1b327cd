"""The dense path of LSH attention: when every chunk window spans the whole
input, non-causal LSH attention is full shared-QK attention, computed
exactly and more cheaply without hashing."""

import math

import tensorflow as tf

from keras_reformer.lsh.scores import bias_from_masks, unit_keys
from keras_reformer.ops.dropout import keep_mask


def window_covers_all(num_chunks, chunks_before, chunks_after):
    """True when every non-causal query's chunk window spans the whole input.

    Then non-causal LSH attention is full attention, computed densely
    (exactly, and cheaper than hashing). The causal rule (own bucket) has no
    such shortcut. Works on python ints and scalar tensors.
    """
    return num_chunks - 1 <= min(chunks_before, chunks_after)


def dense_attend(qk, values, valid, *, dropout_rate=0.0, dropout_seed=None):
    """Plain non-causal shared-QK softmax attention, (B, H, L, E), for short
    inputs with no explicit mask (see `window_covers_all`)."""
    scale = 1.0 / math.sqrt(float(qk.shape[-1]))
    logits = tf.matmul(qk, unit_keys(qk), transpose_b=True) * scale  # (B,H,L,L)
    positions = tf.range(tf.shape(qk)[2])
    masked = tf.logical_not(valid)[:, None, None, :]
    same = positions[:, None] == positions[None, :]
    probs = tf.nn.softmax(logits + bias_from_masks(same, masked, qk.dtype), axis=-1)
    if dropout_rate > 0:
        probs = probs * keep_mask(tf.shape(probs), dropout_rate, dropout_seed, qk.dtype)
    return tf.matmul(probs, values)
