"""Chunk windows: the sequence cut into chunks of `c` positions; chunk `i`
attends to chunks `i - before` ... `i + after`.

Tensors are laid out (B, H, n, c, ...) for n chunks. A window is the
concatenation of its chunks along the position axis, (B, H, n, W, ...) with
`W = (before + 1 + after) * c`. Chunks outside the sequence are zeros, and
their positions are masked: a window never wraps around the sequence's ends.
"""

import tensorflow as tf


def to_chunks(x, c):
    """(B, H, L, ...) with L a multiple of c -> (B, H, L / c, c, ...)."""
    shape = tf.shape(x)
    rest = x.shape[3:].as_list()
    static = [x.shape[0], x.shape[1]]
    dims = [s if s is not None else shape[i] for i, s in enumerate(static)]
    return tf.reshape(x, dims + [-1, c] + rest)


def from_chunks(x):
    """(B, H, n, c, ...) -> (B, H, n * c, ...)."""
    shape = tf.shape(x)
    rest = x.shape[4:].as_list()
    dims = [s if s is not None else shape[i] for i, s in enumerate(x.shape[:2])]
    return tf.reshape(x, dims + [-1] + rest)


def windows(chunks, before, after, fill=0):
    """(B, H, n, c, ...) -> (B, H, n, W, ...): each chunk's window, chunks
    beyond either end filled with `fill`."""
    if before == 0 and after == 0:
        return chunks
    rank = len(chunks.shape)
    paddings = [[0, 0]] * rank
    paddings[2] = [before, after]
    padded = tf.pad(chunks, paddings, constant_values=fill)
    n = tf.shape(chunks)[2]
    pieces = [padded[:, :, start:start + n] for start in range(before + after + 1)]
    return tf.concat(pieces, axis=3)


def key_positions(n, c, before, after):
    """(n, W) int32: the sequence position of each window slot (slots of
    chunks beyond the ends get positions outside [0, n * c))."""
    chunk = tf.range(n)[:, None] + tf.range(-before, after + 1)[None, :]
    positions = chunk[:, :, None] * c + tf.range(c)[None, None, :]
    return tf.reshape(positions, [n, (before + 1 + after) * c])


def query_key_windows(query_key_mask, c, before, after):
    """A (Bm, Hm, L, L) query-key mask -> (Bm, Hm, n, c, W): for each query,
    the entries of its window's keys (False beyond the ends)."""
    length = tf.shape(query_key_mask)[-1]
    n = length // c
    rows = tf.reshape(query_key_mask, tf.concat(
        [tf.shape(query_key_mask)[:2], [n, c, length]], 0))
    positions = key_positions(n, c, before, after)
    inside = (positions >= 0) & (positions < length)
    index = tf.clip_by_value(positions, 0, length - 1)  # (n, W)
    # Move the key axis next to the chunk axis, gather each chunk's keys.
    keys_first = tf.transpose(rows, [0, 1, 2, 4, 3])  # (Bm, Hm, n, L, c)
    gathered = tf.gather(keys_first, tf.broadcast_to(
        index, tf.concat([tf.shape(rows)[:2], tf.shape(index)], 0)),
        axis=3, batch_dims=3)  # (Bm, Hm, n, W, c)
    gathered = tf.transpose(gathered, [0, 1, 2, 4, 3])
    return gathered & inside[:, None, :]


def window_mask(valid, c, before, after, causal, query_key_mask=None):
    """Which window slots each query may attend to.

    Args:
        valid: (B, Lp) bool, the keys some query may attend to (False on
            padding, and on the positions that pad L to whole chunks).
        c, before, after: chunk length and window.
        causal: python bool, keys after the query are masked.
        query_key_mask: None or (Bm, Hm, Lp, Lp) bool.

    Returns:
        (B or Bm, 1 or Hm, n, c, W) bool.
    """
    n = tf.shape(valid)[1] // c
    key_valid = windows(to_chunks(valid[:, None], c), before, after, fill=False)
    mask = key_valid[:, :, :, None, :]  # (B, 1, n, 1, W)
    if causal:
        keys = key_positions(n, c, before, after)  # (n, W)
        queries = tf.reshape(tf.range(n * c), [n, c])
        mask = mask & (keys[:, None, :] <= queries[:, :, None])
    if query_key_mask is not None:
        mask = mask & query_key_windows(query_key_mask, c, before, after)
    return mask
