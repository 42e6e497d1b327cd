"""The random rotations of LSH hashing, bit-identical in eager mode, under XLA
and in a SavedModel.

`tf.random.stateless_normal` draws different numbers with and without XLA
(its Gaussian transform differs between the TF kernel and the XLA lowering),
and Keras' seeded generators are stateful. Inference-time hash rotations must
be the same everywhere, so we draw Philox integers (identical in every mode,
checked in tests/lsh/test_rotations.py) and turn them into approximately normal
numbers with integer arithmetic only: the Irwin-Hall sum of 12 uniforms.
"""

import tensorflow as tf

# Twelve 16-bit uniforms come from six 32-bit Philox draws.
_DRAWS = 6
_HALF = 0xFFFF


@tf.autograph.experimental.do_not_convert
def deterministic_normal(shape, seed):
    """Approximately standard-normal float32 numbers, reproducible everywhere.

    Args:
        shape: int list or 1-D int tensor (may hold dynamic sizes).
        seed: two int32 values (list, tuple or tensor).

    Returns:
        A float32 tensor of `shape` with mean ~0 and variance ~1, bounded by
        +-6 (Irwin-Hall with 12 terms), which is ample for random rotations.
    """
    shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    full = tf.concat([shape, [_DRAWS]], axis=0)
    bits = tf.random.stateless_uniform(
        full, seed=seed, minval=None, maxval=None, dtype=tf.int32, alg="philox"
    )
    low = tf.bitwise.bitwise_and(bits, _HALF)
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 16), _HALF)
    # The integer sum is exact, so the float below is the same in every mode.
    total = tf.reduce_sum(low, axis=-1) + tf.reduce_sum(high, axis=-1)
    return tf.cast(total, tf.float32) * (1.0 / 65536.0) - 6.0


# Plain TensorFlow ops over Python loops: nothing for autograph to convert.
# Converted, it was once called as another converted function of the layer
# (`inference_rotations`, with this one's four arguments) late in a long
# test process: autograph's conversion cache is kept out of this path.
@tf.autograph.experimental.do_not_convert
def draw_rotations(key_dim, factors, num_hashes, seed):
    """One (key_dim, num_hashes, n / 2) rotation per bucket factor n.

    Args:
        key_dim: int, the width of the hashed vectors.
        factors: one or two even bucket counts (two: factorized hashing).
        num_hashes: int, hash rounds.
        seed: (2,) int32 tensor; factor i draws from it folded with i + 1.

    Returns:
        A list of float32 tensors, one per factor.
    """
    rotations = []
    for i, n in enumerate(factors):
        factor_seed = tf.random.experimental.stateless_fold_in(seed, i + 1)
        shape = tf.stack([key_dim, num_hashes, n // 2])
        rotations.append(deterministic_normal(shape, factor_seed))
    return rotations
