"""Cached causal decoding for local attention.

A causal query at position p sees the keys from the start of chunk
`p // c - before` up to p: at most `W = (before + 1) * c` positions, all
among the last W. The cache is a ring buffer of W slots per (batch, head):
position q lives in slot `q % W`, with its key, its value and q itself
(-1: empty). A step writes its own key and value, then attends to the slots
whose positions are in the query's window: the same keys, scores and
softmax as the full causal pass, at a cost that does not grow with the text.
"""

import tensorflow as tf

from keras_reformer.lsh import scores


def ring_size(c, before):
    return (before + 1) * c


def init_cache(keys, values, padding_mask, c, before):
    """The cache after a causal pass over a prompt.

    Args:
        keys, values: (B, H, P, D) and (B, H, P, E) float32 of the prompt.
        padding_mask: (B, P) bool, True on the positions to cache: each row's
            first positions (right-padded prompts).
        c, before: chunk length and earlier chunks of the layer.

    Returns:
        dict of "keys" (B, H, W, D), "values" (B, H, W, E), "positions"
        (B, W) int32.
    """
    size = ring_size(c, before)
    mask = tf.cast(padding_mask, tf.bool)
    last = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1) - 1  # (B,)
    # The latest position <= last that lives in each slot (negative: none).
    slots = tf.range(size)[None, :]
    positions = last[:, None] - tf.math.floormod(last[:, None] - slots, size)
    # One zero position appended, so that every index is in range (also for
    # an empty prompt); slots that point there are empty anyway.
    index = tf.maximum(positions, 0)
    mask = tf.pad(mask, [[0, 0], [0, 1]])
    held = (positions >= 0) & tf.gather(mask, index, axis=1, batch_dims=1)

    def gather(x):
        x = tf.pad(x, [[0, 0], [0, 0], [0, 1], [0, 0]])
        return tf.gather(x, index, axis=2, batch_dims=1)  # (B, H, W, .)

    return {
        "keys": gather(keys),
        "values": gather(values),
        "positions": tf.where(held, positions, -1),
    }


def decode_step(cache, query, key, value, position, c, before):
    """Causal attention of one new position per row, from the cache.

    Args:
        cache: from `init_cache` or a previous step.
        query, key, value: (B, H, D), (B, H, D), (B, H, E) float32 at the new
            position; the query already scaled.
        position: (B,) int32, the new position of each row (every earlier
            position of its window is in the cache).
        c, before: chunk length and earlier chunks of the layer.

    Returns:
        (output (B, H, E), updated cache).
    """
    size = ring_size(c, before)
    position = tf.cast(position, tf.int32)
    write = tf.one_hot(tf.math.floormod(position, size), size, on_value=True,
                       off_value=False, dtype=tf.bool)  # (B, W)
    keys = tf.where(write[:, None, :, None], key[:, :, None], cache["keys"])
    values = tf.where(write[:, None, :, None], value[:, :, None], cache["values"])
    positions = tf.where(write, position[:, None], cache["positions"])
    start = (position // c - before) * c
    allowed = (positions >= tf.maximum(start, 0)[:, None]) & (
        positions <= position[:, None])  # (B, W)
    logits = tf.einsum("bhd,bhwd->bhw", query, keys)
    logits = tf.where(allowed[:, None, :], logits, scores.MASK_VALUE)
    # The query's own key is always allowed: no empty windows here.
    weights = tf.nn.softmax(logits, axis=-1)
    out = tf.einsum("bhw,bhwe->bhe", weights, values)
    return out, {"keys": keys, "values": values, "positions": positions}
