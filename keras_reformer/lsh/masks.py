"""The masks of LSHAttention: MultiHeadAttention's mask forms.

`MultiHeadAttention` accepts an `attention_mask` that broadcasts to its
scores `(B, *free, heads, *T, *S)`. LSH attention works on the input folded
to `(batch, length)` by the layer (`lsh_attention.Folded`); these helpers map
the masks along and find the keys some query may attend to. A query-key mask
is a (Bm, Hm, L, L) bool tensor of allowed (query, key), Bm in {1, B},
Hm in {1, heads}.
"""

import tensorflow as tf


def broadcast_query_key_mask(mask, folded, heads):
    """An MHA `attention_mask` -> a (Bm, Hm, L, L) query-key mask, Bm in
    {1, B'}, Hm in {1, heads}.

    The mask is expanded exactly as `MultiHeadAttention._masked_softmax` does
    (size-1 axes inserted before the query axes until it has the scores'
    rank), so every shape MHA accepts means the same here.
    """
    mask = tf.cast(tf.convert_to_tensor(mask), tf.bool)
    na, nf = len(folded.attention), len(folded.free)
    scores_rank = nf + 1 + 2 * na
    expected = folded.free_sizes + [heads] + folded.attention_sizes * 2
    names = ["B"] + [f"free{i}" for i in range(1, nf)] + ["num_heads"] + [
        f"T{i}" for i in range(na)] + [f"S{i}" for i in range(na)]
    if mask.shape.rank is None or mask.shape.rank < 2 * na or mask.shape.rank > scores_rank:
        raise ValueError(
            "`attention_mask` must broadcast to the attention scores' shape "
            f"({', '.join(names)}) = {_static(expected)}. Received: "
            f"attention_mask.shape={tuple(mask.shape)}"
        )
    while mask.shape.rank < scores_rank:
        mask = tf.expand_dims(mask, -(2 * na + 1))
    for axis, (size, want) in enumerate(zip(mask.shape, expected)):
        if size is not None and size != 1 and isinstance(want, int) and size != want:
            raise ValueError(
                "`attention_mask` must broadcast to the attention scores' "
                f"shape ({', '.join(names)}) = {_static(expected)}; its axis "
                f"{axis} ({names[axis]}) has size {size}. Received: "
                f"attention_mask.shape={tuple(mask.shape)}"
            )
    free_one = all(mask.shape[a] == 1 for a in range(nf))
    head_one = mask.shape[nf] == 1
    target = ([1] * nf if free_one else folded.free_sizes) + [
        1 if head_one else heads] + folded.attention_sizes * 2
    mask = tf.broadcast_to(mask, tf.stack(target) if _dynamic(target) else target)
    length = folded.length
    return tf.reshape(mask, [
        1 if free_one else folded.batch, 1 if head_one else heads,
        length, length,
    ])


def _dynamic(sizes):
    return any(not isinstance(s, int) for s in sizes)


def _static(sizes):
    return tuple(s if isinstance(s, int) else None for s in sizes)


def valid_keys(key_masks, query_key_mask, batch, length, causal):
    """The keys some query may attend to, and the rows that ask for causality.

    Args:
        key_masks: (B, L) masks or Nones (the Keras masks of the inputs).
        query_key_mask: None or a (Bm, Hm, L, L) query-key mask.
        batch, length: B and L (ints or scalar tensors).
        causal: python bool, the layer's `use_causal_mask`.

    Returns:
        valid: (B, L) bool; a key that no query may attend to is padding.
        causal_rows: None, or (B, Hm) bool: the rows of a non-causal call
            whose query-key mask admits no later key (`admits_no_later_key`).
    """
    valid = tf.ones([batch, length], tf.bool)
    for mask in key_masks:
        if mask is not None:
            valid = tf.logical_and(valid, tf.cast(mask, tf.bool))
    if query_key_mask is None:
        return valid, None
    # Only the columns of the query-key mask that some query may use.
    valid = tf.logical_and(valid, tf.reduce_any(query_key_mask, axis=[1, 2]))
    if causal:
        return valid, None
    return valid, admits_no_later_key(query_key_mask, valid)


def admits_no_later_key(query_key_mask, valid):
    """(B, Hm) bool: no real query of the row may attend to a later real key.

    Such a mask (lower-triangular, maybe merged with padding) asks for
    causal attention, so those rows follow the causal rule: plain chunk
    windows would let later tokens decide which earlier keys a query sees.
    Decided per batch row, on that row's real positions, also for a mask
    shared by the batch (Bm = 1): a row's rule, hence its outputs, must not
    depend on the other rows of its batch.
    """
    length = tf.shape(query_key_mask)[-1]
    positions = tf.range(length)
    later = positions[None, :] > positions[:, None]  # (query, key)
    future = tf.cast(tf.logical_and(query_key_mask, later), tf.float32)
    real = tf.cast(valid, tf.float32)
    # Allowed later (real query, real key) pairs per row, without a
    # (B, Hm, L, L) tensor for a shared mask: sums of ones, exact enough
    # for a comparison with zero.
    equation = "bq,hqk,bk->bh" if query_key_mask.shape[0] == 1 else "bq,bhqk,bk->bh"
    if query_key_mask.shape[0] == 1:
        future = future[0]
    return tf.einsum(equation, real, future, real) == 0
