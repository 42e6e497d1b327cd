"""Position-wise functions applied slice by slice, forward and backward.

`chunked_map(fn, x, params, chunk_size)` computes `fn` on slices of
`chunk_size` positions of `x` (batch, length, features) and concatenates the
results. Its gradient (a `tf.custom_gradient`) walks the slices again,
recomputes each slice under a gradient tape and takes that slice's input
gradient and its contribution to the parameter gradients. So whatever wide
intermediate `fn` makes (the `d_ff`-wide hidden layer of a feed-forward
network) exists for one slice at a time, in the forward and in the backward
pass (the paper's chunked feed-forward layers, Kitaev et al., 2020, section 4).

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

`chunked_value_and_vjp(fn, x, dy, params, chunk_size)` is the fused pass a
recomputing caller needs when it already knows the upstream gradient `dy`
(ReversibleSequence's backward rebuilding a block's inputs needs the
block's output and its VJP): one walk over the slices, one tape per slice,
giving each slice's output and gradients together. Done as `chunked_map`
under a tape instead, every slice's forward would run twice (once in
`chunked_map`'s forward, once again in its gradient).
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
                _, dx, dparams = _backward(fn, x_padded, dy_padded, params, n, c)
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


def chunked_value_and_vjp(fn, x, dy, params, chunk_size):
    """`fn` over slices of `x` and its VJP with `dy`, in one pass over the slices.

    Equals `y = chunked_map(fn, x, params, chunk_size)` and the gradients of
    `y` with upstream gradient `dy`, but each slice's forward runs once (under
    that slice's tape) instead of twice, and, like `chunked_map`, only one
    slice's intermediates exist at a time.

    Args:
        fn, x, params, chunk_size: as in `chunked_map`.
        dy: (batch, length, out_features) upstream gradient of the output, in
            `fn`'s output dtype.

    Returns:
        `(y, dx, dparams)`: the output (batch, length, out_features), the
        gradient with respect to `x`, and the list of gradients with respect
        to `params` (summed over slices). All are values for a backward pass
        to consume: they are not differentiable (a gradient stops there).
    """
    params = list(params)
    x = tf.convert_to_tensor(x)
    dy = tf.convert_to_tensor(dy)
    length = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
    c = int(chunk_size)
    n = _num_slices(length, c)
    pad = n * c - length
    # "chunked_map" in the scope's name: the profile counts it as FFN time.
    with tf.name_scope("chunked_map_value_and_vjp"):
        paddings = [[0, 0], [0, pad], [0, 0]]
        y, dx, dparams = _backward(
            fn, tf.pad(x, paddings), tf.pad(dy, paddings), params, n, c,
            keep_outputs=True,
        )
        y = tf.stop_gradient(y[:, :length])
        dx = tf.stop_gradient(dx[:, :length])
        return y, dx, [tf.stop_gradient(g) for g in dparams]


def _slice_vjp(fn, xs, dys, params, index):
    """One slice: `fn`'s output and its gradients for `xs` and `params`."""
    # The recomputation waits for (and XLA cannot merge it past) its gradient.
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
    return ys, grads[0], grads[1:]


def _backward(fn, x_padded, dy_padded, params, n, c, keep_outputs=False):
    """(ys or None, dx, dparams) over the padded length, slice by slice.

    The slices' outputs are collected only with `keep_outputs` (the fused
    pass); `chunked_map`'s gradient has them already.
    """
    if isinstance(n, int) and n == 1:
        ys, dx, dp = _slice_vjp(fn, x_padded, dy_padded, params, tf.constant(0))
        return (ys if keep_outputs else None), dx, dp
    ys0, dx0, dp0 = _slice_vjp(
        fn, _slice(x_padded, tf.constant(0), c), _slice(dy_padded, tf.constant(0), c),
        params, tf.constant(0),
    )
    collectors = [_collector(dx0, n, c, dy_padded)]
    if keep_outputs:
        collectors.append(_collector(ys0, n, c, dy_padded))
    k = len(collectors)

    def body(i, *state):
        ys, dx, dp = _slice_vjp(
            fn, _slice(x_padded, i, c), _slice(dy_padded, i, c), params, i
        )
        written = [_collect(o, i, c, v) for o, v in zip(state[:k], (dx, ys))]
        return (i + 1, *written) + tuple(t + g for t, g in zip(state[k:], dp))

    result = tf.while_loop(
        lambda i, *_: i < n, body, [tf.constant(1)] + collectors + list(dp0),
        parallel_iterations=1,
    )
    collected = [_collected(o, n * c) for o in result[1:1 + k]]
    ys = collected[1] if keep_outputs else None
    return ys, collected[0], list(result[1 + k:])


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

