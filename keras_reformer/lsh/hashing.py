"""Angular LSH (Kitaev et al., 2020, section 2): bucket counts and the
bucket of each vector, `argmax([xR; -xR])` for random rotations R.

Shapes: B batch, H heads, R hash rounds, L length, D key width.
"""

import math

import tensorflow as tf

# Above this many buckets the (D x buckets/2) projection costs more than the
# chunked attention itself (2 * C keys per query at C = 64), so derived bucket
# counts are factorized into two hashes of about sqrt(buckets) each.
DEFAULT_FACTORIZE_ABOVE = 256


def derived_num_buckets(padded_length, bucket_size):
    """Bucket count used when `num_buckets=None`: 2 * length / bucket_size.

    Gives buckets of about bucket_size / 2 positions, so a bucket rarely
    spills over a chunk (the paper's choice). Always even and at least 2.
    The layer fixes it at build time from a static length, never from a
    batch's (padded) length, so it takes python ints only.
    """
    return max(2, 2 * (padded_length // bucket_size))


def factor_num_buckets(num_buckets):
    """Split an even bucket count into two even factors with product >= it."""
    first = 2 * math.ceil(math.sqrt(num_buckets) / 2)
    second = 2 * math.ceil(num_buckets / first / 2)
    return first, second


def hash_vectors(vectors, rotations):
    """Angular LSH: bucket = argmax([xR; -xR]), one or two (factorized) hashes.

    Args:
        vectors: (B, H, L, D) float32.
        rotations: list of one or two (D, R, n_i / 2) float32 tensors.

    Returns:
        (B, H, R, L) int32 bucket ids in [0, prod(n_i)).
    """
    with tf.name_scope("lsh_hash"):  # scopes name the profile's categories
        return _hash(vectors, rotations)


def _hash(vectors, rotations, equation="bhld,drk->bhlrk"):
    """The factors' bucket ids combined, first factor fastest; `equation`
    projects (B, H, L, D) vectors by one factor's rotation to (B, H, L, R, n/2)."""
    buckets = None
    stride = None
    for rotation in rotations:
        if buckets is not None:
            # One factor's projection at a time: the next waits for this one.
            with tf.control_dependencies([buckets]):
                vectors = tf.identity(vectors)
        index = _half_argmax(tf.einsum(equation, vectors, rotation))
        index = tf.transpose(index, [0, 1, 3, 2])  # (B, H, R, L)
        size = 2 * tf.shape(rotation)[-1]
        if buckets is None:
            buckets, stride = index, size
        else:
            buckets, stride = buckets + stride * index, stride * size
    return buckets


def hash_per_head(vectors, rotations, factors):
    """Angular LSH with one rotation per head, as the reference
    implementation hashes (`LSHAttention(reference_rules=True)`).

    Args:
        vectors: (B, H, L, D) float32.
        rotations: (H, D, R, sum(factors) / 2) float32, the factors' columns
            side by side.
        factors: tuple of even bucket counts.

    Returns:
        (B, H, R, L) int32 bucket ids in [0, prod(factors)), the first
        factor varying fastest (as in `hash_vectors`).
    """
    # The factors' columns side by side: one rotation per factor, per head.
    starts = [sum(factors[:i]) // 2 for i in range(len(factors) + 1)]
    parts = [rotations[..., a:b] for a, b in zip(starts, starts[1:])]
    with tf.name_scope("lsh_hash"):
        return _hash(vectors, parts, "bhld,hdrk->bhlrk")


def _half_argmax(projected):
    """`argmax(concat([projected, -projected], -1))` without the (2x wider)
    concatenation: the largest entry of `projected` if it is at least the
    negated smallest (the first half wins ties, as in the concatenation),
    else the smallest's index plus the half width. Over the last axis."""
    top = tf.reduce_max(projected, axis=-1)
    bottom = tf.reduce_min(projected, axis=-1)
    width = tf.shape(projected)[-1]
    return tf.where(
        top >= -bottom,
        tf.argmax(projected, axis=-1, output_type=tf.int32),
        tf.argmin(projected, axis=-1, output_type=tf.int32) + width,
    )
