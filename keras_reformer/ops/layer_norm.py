"""Layer normalization over the last axis, with a gradient that keeps only
the input and two numbers per row."""

import keras
import tensorflow as tf


def layer_norm(x, gamma, beta, epsilon):
    """`(x - mean) / sqrt(var + epsilon) * gamma + beta` over the last axis,
    computed in float32 (or float64), returned in `x`'s dtype.

    Autodiff through the moments keeps two more full-size tensors per call
    (the centred input and its scaled copy) until the backward pass reaches
    them: in a reversible block's recomputation at 64K tokens and width 256,
    128 MiB. This gradient keeps `x`, the mean and the reciprocal standard
    deviation, and recomputes the normalized input.

    `x` may also be a list of tensors, the parts of the input along the last
    axis: the result is that of their concatenation, and the gradient keeps
    the parts, not the concatenation (the final norm over a reversible
    stack's two output streams, which its backward pass keeps anyway: at
    128K tokens and width 2 x 256, 256 MiB less at a training step's peak).
    """
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    dtype = parts[0].dtype
    compute = tf.float64 if dtype == tf.float64 else tf.float32
    widths = [p.shape[-1] for p in parts]
    starts = [sum(widths[:k]) for k in range(len(parts))]

    @tf.custom_gradient
    def norm(gamma, beta, *parts):
        wide = tf.cast(parts[0] if len(parts) == 1 else tf.concat(parts, -1), compute)
        # Keras' own forward arithmetic, to the rounding: a cached decoding
        # step must normalize a position exactly as the full pass did, or a
        # near-tie in the hashing can put it in another bucket.
        mean, variance = keras.ops.moments(wide, axes=[-1], keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)
        scale = rstd * tf.cast(gamma, compute)
        out = wide * scale + (tf.cast(beta, compute) - mean * scale)

        def grad(d_out):
            d_gamma, d_beta, d_parts = _gradients(
                d_out, parts, starts, widths, mean, rstd, gamma, compute)
            return [tf.cast(d_gamma, gamma.dtype), tf.cast(d_beta, beta.dtype),
                    *[tf.cast(d, dtype) for d in d_parts]]

        return tf.cast(out, dtype), grad

    return norm(gamma, beta, *parts)


# Rows per slice of the gradient's loop, for inputs of more rows than this:
# XLA keeps the gradient's elementwise products (three of the input's size)
# as buffers of their own; sliced, they are a slice's size.
GRADIENT_ROWS = 8192


def _gradients(d_out, parts, starts, widths, mean, rstd, gamma, compute):
    """`(d_gamma, d_beta, d_parts)` in `compute`, a slice of rows at a time
    for many rows."""
    gamma = tf.cast(gamma, compute)
    shape = d_out.shape
    rows = shape[:-1].num_elements()
    slice_rows = _slice_rows(rows)
    if slice_rows is None:
        return _row_gradients(tf.cast(d_out, compute), parts, starts, widths,
                              mean, rstd, gamma, compute, axes=list(range(len(shape) - 1)))

    def flat(t):
        return tf.reshape(t, [rows, t.shape[-1]])

    d_out, mean, rstd = flat(d_out), flat(mean), flat(rstd)
    parts = [flat(p) for p in parts]
    count = rows // slice_rows
    arrays = [tf.TensorArray(compute, size=count, element_shape=[slice_rows, w])
              for w in widths]

    def body(i, d_gamma, d_beta, *arrays):
        def rows_of(t):
            return tf.slice(t, [i * slice_rows, 0], [slice_rows, t.shape[-1]])

        g, b, d_parts = _row_gradients(
            tf.cast(rows_of(d_out), compute), [rows_of(p) for p in parts], starts,
            widths, rows_of(mean), rows_of(rstd), gamma, compute, axes=[0])
        return (i + 1, d_gamma + g, d_beta + b,
                *[a.write(i, d) for a, d in zip(arrays, d_parts)])

    width = sum(widths)
    _, d_gamma, d_beta, *arrays = tf.while_loop(
        lambda i, *_: i < count, body,
        (tf.constant(0), tf.zeros([width], compute), tf.zeros([width], compute),
         *arrays), parallel_iterations=1)
    d_parts = [tf.reshape(a.stack(), shape[:-1].concatenate([w]))
               for a, w in zip(arrays, widths)]
    return d_gamma, d_beta, d_parts


def _slice_rows(rows):
    """Rows per slice of the gradient's loop (a divisor of `rows`), or None
    to take all rows at once (few rows, or a count known only at run time)."""
    if rows is None or rows <= GRADIENT_ROWS:
        return None
    best = next((s for s in range(GRADIENT_ROWS, 0, -1) if rows % s == 0), 1)
    return best if best >= GRADIENT_ROWS // 8 else None


def _row_gradients(d_out, parts, starts, widths, mean, rstd, gamma, compute, axes):
    """The gradients for these rows: `(d_gamma, d_beta, d_parts)`, d_gamma
    and d_beta summed over `axes`."""
    # Part by part: each part's normalized input and gradients, the row
    # means (over the whole width) summed over the parts.
    normed, d_normed, d_gamma = [], [], []
    for part, start, width in zip(parts, starts, widths):
        n = (tf.cast(part, compute) - mean) * rstd
        d = d_out[..., start:start + width]
        normed.append(n)
        d_normed.append(d * gamma[start:start + width])
        d_gamma.append(tf.reduce_sum(d * n, axis=axes))
    total = float(sum(widths))
    mean_d = sum(tf.reduce_sum(d, axis=-1, keepdims=True) for d in d_normed) / total
    mean_dn = sum(tf.reduce_sum(d * n, axis=-1, keepdims=True)
                  for d, n in zip(d_normed, normed)) / total
    d_parts = [rstd * (d - mean_d - n * mean_dn) for d, n in zip(d_normed, normed)]
    d_gamma = d_gamma[0] if len(parts) == 1 else tf.concat(d_gamma, 0)
    return d_gamma, tf.reduce_sum(d_out, axis=axes), d_parts
