"""Position-wise functions applied slice by slice, forward and backward.

`chunked_map(fn, x, params, chunk_size)` computes `fn` on slices of
`chunk_size` positions of `x` (batch, length, features) and concatenates the
results. Its gradient (a `tf.custom_gradient`) walks the slices again,
recomputes each slice under a gradient tape and takes that slice's input
gradient and its contribution to the parameter gradients. So whatever wide
intermediate `fn` makes (the `d_ff`-wide hidden layer of a feed-forward
network) exists for one slice at a time, in the forward and in the backward
pass (REFORMER.md section 4).

Both loops are `tf.while_loop`s with `parallel_iterations=1` (otherwise the
executor may run several slices at once); in the backward loop each slice's
recomputation depends on that slice's incoming gradient, so that XLA can
neither merge it with the forward loop nor hoist it out of the loop.

The slices' results are collected in a `TensorArray`, except under XLA:
there a TensorArray starts as a zero constant that XLA shares between all
loops of the program and copies once per loop, and its CPU scheduler makes
those copies at the start of the program, so every such buffer of every
layer was alive at once. Under XLA the results go into a buffer that
depends on the loop's input (so it is made when the loop runs) with
in-place `dynamic_update_slice` writes.
"""

import tensorflow as tf

# In-place slice writes under XLA; Keras' TF backend imports it the same way.
from keras_reformer._compat import dynamic_update_slice
from keras_reformer.ops import recompute


def _num_slices(length, chunk_size):
    return -(-length // chunk_size)


def _slice(x, index, chunk_size):
    # (B, Lp, D) -> (B, C, D): positions [index * C, (index + 1) * C).
    begin = tf.stack([0, index * chunk_size, 0])
    # Explicit sizes: with -1 ("to the end") XLA pads `x` to twice its size
    # in every dimension to keep a dynamic slice in bounds.
    shape = tf.shape(x)
    size = tf.stack([shape[0], chunk_size, shape[2]])
    return tf.slice(x, begin, size)


def _unslice(stacked, length):
    """(N, B, C, E) slices back to (B, length, E)."""
    n, _, c, e = (stacked.shape[i] for i in range(4))
    shape = tf.shape(stacked)
    out = tf.transpose(stacked, [1, 0, 2, 3])
    n = n if n is not None else shape[0]
    c = c if c is not None else shape[2]
    e = e if e is not None else shape[3]
    out = tf.reshape(out, tf.stack([shape[1], n * c, e]))
    return out[:, :length]


def chunked_map(fn, x, params, chunk_size):
    """`fn` over slices of `x` along axis 1, recomputing slice by slice backward.

    Args:
        fn: `fn(x_slice, params, index) -> y_slice`, position-wise: maps
            (batch, chunk_size, features) to (batch, chunk_size, out_features)
            using the tensors in `params`; `index` (int32 scalar tensor) is the
            slice number, e.g. to derive a per-slice dropout seed. Must be a
            deterministic function of its arguments (draw random numbers only
            from seeds derived from tensors it closes over and `index`).
        x: (batch, length, features) tensor; `length` need not be a multiple
            of `chunk_size` (the last slice is zero-padded; the padding never
            reaches the output or the gradients).
        params: list of tensors `fn` differentiates (weights read as tensors).
        chunk_size: positions per slice (python int).

    Returns:
        (batch, length, out_features), the concatenation of the slices.
    """
    params = list(params)
    x = tf.convert_to_tensor(x)
    length = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
    c = int(chunk_size)
    n = _num_slices(length, c)
    pad = n * c - length

    @tf.custom_gradient
    def chunked(x, *params):
        params = list(params)
        # Name scopes name the profile's categories (benchmarks/profile_step.py).
        with recompute.stop_recording(), tf.name_scope("chunked_map"):
            x_padded = tf.pad(x, [[0, 0], [0, pad], [0, 0]])
            out = _forward(fn, x_padded, params, n, c, length)

        def grad_fn(dy):
            with tf.name_scope("chunked_map_grad"):
                dy_padded = tf.pad(dy, [[0, 0], [0, pad], [0, 0]])
                dx, dparams = _backward(fn, x_padded, dy_padded, params, n, c)
                return [dx[:, :length]] + dparams

        return out, grad_fn

    return chunked(x, *params)


def _forward(fn, x_padded, params, n, c, length):
    # The first slice, outside the loop, gives the output's dtype and width.
    first = fn(_slice(x_padded, tf.constant(0), c), params, tf.constant(0))
    if isinstance(n, int) and n == 1:
        return first[:, :length]
    outputs = _collector(first, n, c, x_padded)

    def body(i, outputs):
        return i + 1, _collect(outputs, i, c, fn(_slice(x_padded, i, c), params, i))

    _, outputs = tf.while_loop(
        lambda i, _: i < n, body, [tf.constant(1), outputs],
        parallel_iterations=1,
    )
    return _collected(outputs, length)


def _collector(first, n, c, dependency):
    """Where the loop writes its slices' results, holding slice 0 = `first`."""
    if not recompute.in_xla_context():
        return tf.TensorArray(first.dtype, size=n, element_shape=first.shape).write(
            0, first)
    shape = tf.concat([tf.shape(first)[:1], [n * c], tf.shape(first)[2:]], 0)
    zero = tf.cast(recompute.dependency_zero(dependency), first.dtype)
    buffer = tf.zeros(shape, first.dtype) + zero  # made when `dependency` is
    return dynamic_update_slice(buffer, first, tf.zeros([3], tf.int32))


def _collect(outputs, index, c, value):
    if isinstance(outputs, tf.TensorArray):
        return outputs.write(index, value)
    return dynamic_update_slice(outputs, value, tf.stack([0, index * c, 0]))


def _collected(outputs, length):
    """(batch, length, width) from what `_collect` wrote."""
    if isinstance(outputs, tf.TensorArray):
        return _unslice(outputs.stack(), length)
    return outputs[:, :length]


def _slice_grads(fn, xs, dys, params, index):
    (xs,) = recompute.gradient_dependency([xs], dys)
    inner = [tf.identity(p) for p in params]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        tape.watch(inner)
        ys = fn(xs, inner, index)
    grads = tape.gradient(ys, [xs] + inner, output_gradients=dys)
    grads[0] = tf.zeros_like(xs) if grads[0] is None else grads[0]
    for k, p in enumerate(inner):
        if grads[k + 1] is None:
            grads[k + 1] = tf.zeros_like(p)
    return grads[0], grads[1:]


def _backward(fn, x_padded, dy_padded, params, n, c):
    if isinstance(n, int) and n == 1:
        return _slice_grads(fn, x_padded, dy_padded, params, tf.constant(0))
    dx0, dp0 = _slice_grads(
        fn, _slice(x_padded, tf.constant(0), c), _slice(dy_padded, tf.constant(0), c),
        params, tf.constant(0),
    )
    dxs = _collector(dx0, n, c, dy_padded)

    def body(i, dxs, *totals):
        dx, dp = _slice_grads(
            fn, _slice(x_padded, i, c), _slice(dy_padded, i, c), params, i
        )
        return (i + 1, _collect(dxs, i, c, dx)) + tuple(
            t + g for t, g in zip(totals, dp))

    result = tf.while_loop(
        lambda i, *_: i < n, body, [tf.constant(1), dxs] + list(dp0),
        parallel_iterations=1,
    )
    return _collected(result[1], n * c), list(result[2:])


def slice_seed(seed, index):
    """A per-slice stateless seed from a (2,) seed and a slice index.

    Philox (the same numbers with and without XLA) turns the seed into a key;
    the slice index offsets its second word.
    """
    seed = tf.cast(seed, tf.int32)
    key = tf.random.stateless_uniform(
        [2], seed=seed, minval=None, maxval=None, dtype=tf.int32, alg="philox"
    )
    return tf.stack([key[0], key[1] + tf.cast(index, tf.int32)])


def dropout(x, rate, seed):
    """Inverted dropout of `x` with a stateless mask from `seed` (2 int32)."""
    uniform = tf.random.stateless_uniform(
        tf.shape(x), seed=seed, dtype=tf.float32, alg="philox"
    )
    keep = uniform >= rate
    return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))
