"""The score arithmetic every path of LSH attention shares: the dense pass,
the chunked pass and cached decoding compute the same numbers with it.

Shared QK: a query's keys are the unit-normalised queries. Masking is
additive: a masked key gets MASK_VALUE; a query's own key gets the much
milder SELF_MASK_VALUE so that a query with nothing else to attend to still
has a defined softmax (it attends to itself). Logits are float32, where both
fit. Hash rounds are combined by their share of the total softmax mass.
"""

import tensorflow as tf

MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5


def unit_keys(vectors):
    """The keys of shared-QK vectors: each vector divided by its norm."""
    return vectors * tf.math.rsqrt(
        tf.maximum(tf.reduce_sum(tf.square(vectors), -1, keepdims=True), 1e-12)
    )


def bias_from_masks(same_position, masked, dtype=tf.float32):
    """Additive mask: 0, SELF_MASK_VALUE on self, MASK_VALUE where masked.

    Adding it equals overwriting: a logit plus -1e9 rounds to -1e9 in
    float32. Built from integers only, so it needs no gradient. The two
    masks broadcast against each other.
    """
    self_bias = tf.where(same_position, tf.constant(SELF_MASK_VALUE, dtype),
                         tf.constant(0.0, dtype))
    return tf.where(masked, tf.constant(MASK_VALUE, dtype), self_bias)


def combine_rounds(out, lse, axis, strict=False):
    """The rounds' outputs `out` (rounds on `axis`, features last) weighed by
    their share of the total softmax mass, `lse` (`out`'s shape without the
    features). With `strict`, a query with no allowed key in any round (the
    first of its bucket in each) has only masked logits: its softmax spreads
    over the window, future included, so its output is zero instead."""
    weights = tf.nn.softmax(lse, axis=axis)
    combined = tf.reduce_sum(out * weights[..., None], axis=axis)
    return zero_without_key(combined, lse, axis) if strict else combined


def zero_without_key(combined, lse, axis):
    """`combined` with zeros for the queries whose logsumexp `lse` is masked
    in every round (rounds on `axis`): the strict rule's "no key, no output"."""
    has_key = tf.reduce_max(lse, axis=axis) > 0.5 * MASK_VALUE
    return combined * tf.cast(has_key, combined.dtype)[..., None]
