"""Heads one at a time, for inputs so long that per-head tensors of all heads
at once dominate a training step's memory.

`LSHAttention` writes its output as a sum over heads,
`y = sum_h attend(x Wqk_h, x Wv_h) Wo_h`. Run for all heads at once, its
gradient keeps the (B, H, L, D) projections, the attention output and their
gradients: at 128K tokens and 4 x 64 heads, 128 MiB each, several alive at
once. `sum_over_heads` runs the sum in a loop whose gradient recomputes one
head at a time, so only one head's share of those tensors is ever alive.
"""

import tensorflow as tf

# Static elements of one head-stacked (L, H, D) tensor per batch row above
# which the layer runs its heads one at a time (2^24 float32 = 64 MiB: with
# 4 x 64 heads, from 128K tokens on). Below it, all heads at once are faster
# and their tensors small.
HEAD_LOOP_ELEMENTS = 2**24


def sum_over_heads(head_fn, x, per_head, num_heads, output_dim):
    """`sum_h head_fn(h, x, *[w[h] for w in per_head])`, float32, in a loop
    whose gradient recomputes each head.

    Args:
        head_fn: `(h, x, *weights_of_head_h) -> (B, L, output_dim)`; `h` a
            scalar int32 tensor. Deterministic given its arguments (random
            numbers drawn before, from seeds it derives from `h`).
        x: (B, L, F) input.
        per_head: tensors with the head on axis 0 (kernels, biases), each
            differentiated.
        num_heads: int, H.
        output_dim: int, the width of `head_fn`'s output. Known up front,
            the sum starts from zeros inside the loop, so `head_fn` is
            traced once for the forward pass and once for the gradient
            (not a third time for a first head outside the loop).

    Returns:
        (B, L, output_dim) float32 sum.
    """

    @tf.custom_gradient
    def looped(x, *weights):
        def body(h, total):
            return h + 1, total + tf.cast(head_fn(h, x, *_weights_of(h, weights)),
                                          tf.float32)

        _, total = tf.while_loop(lambda h, _: h < num_heads, body,
                                 (tf.constant(0), _zero_sum(x, output_dim)),
                                 parallel_iterations=1)

        def grad(d_total):
            # In a reversible backward pass the forward loop has just been
            # rerun to rebuild the block's input; run side by side, the two
            # loops would hold two heads' tensors at once.
            with tf.control_dependencies([total]):
                start = tf.constant(0)
            _, dx, dweights = _vjp_loop(head_fn, x, weights, num_heads, d_total,
                                        start, output_dim=None)
            return [dx] + dweights

        return total, grad

    return looped(x, *per_head)


def sum_and_vjp_over_heads(head_fn, x, per_head, num_heads, output_dim, d_total):
    """`sum_over_heads` and its VJP with `d_total`, each head run once.

    What a reversible backward pass needs of a block: its output (to rebuild
    the block's input) and its VJP, with an upstream gradient known before
    the output. `sum_over_heads` under a tape would run every head twice
    there, once for the sum and once more in its recomputing gradient; here
    each head's forward runs once, under its own tape, and gives its share
    of the sum and of the gradients.

    Args:
        head_fn, x, per_head, num_heads, output_dim: as in `sum_over_heads`.
        d_total: (B, L, output_dim) gradient of the sum.

    Returns:
        `(total, dx, dper_head)`: the float32 sum, the gradient with respect
        to `x` and the list of gradients with respect to `per_head` (head on
        axis 0). Values for a backward pass: a gradient stops there.
    """
    # Cut from the caller's tape on the way in: its gradient ends at `x` and
    # `per_head`, and recording the loop's own tapes and gradients (loops of
    # recomputing gradients inside) would have TF try to differentiate them.
    x, d_total = tf.stop_gradient(x), tf.stop_gradient(tf.cast(d_total, tf.float32))
    per_head = [tf.stop_gradient(w) for w in per_head]
    return _vjp_loop(head_fn, x, per_head, num_heads, d_total, tf.constant(0),
                     output_dim=output_dim)


def _zero_sum(x, output_dim):
    """float32 zeros of shape (B, L, output_dim), static where `x`'s is."""
    zeros = tf.zeros(tf.concat([tf.shape(x)[:-1], [output_dim]], 0), tf.float32)
    return tf.ensure_shape(zeros, x.shape[:-1].concatenate([output_dim]))


def _weights_of(h, weights):
    return [tf.gather(w, h) for w in weights]


def _vjp_loop(head_fn, x, weights, num_heads, d_total, start, output_dim):
    """Heads `start..num_heads-1`, each recomputed under a tape: the sum of
    their VJPs with `d_total` (for `x`; per head for `weights`), and with an
    `output_dim` the sum of their outputs too (else None)."""
    arrays = [tf.TensorArray(w.dtype, size=num_heads, element_shape=w.shape[1:])
              for w in weights]
    totals = [] if output_dim is None else [_zero_sum(x, output_dim)]

    def body(h, dx, *state):
        parts = _weights_of(h, weights)
        with tf.GradientTape() as tape:
            tape.watch([x] + parts)
            out = tf.cast(head_fn(h, x, *parts), tf.float32)
        grads = tape.gradient(out, [x] + parts, output_gradients=d_total)
        sums = [state[0] + out] if totals else []
        arrays_h = state[len(totals):]
        return (h + 1, dx + grads[0], *sums,
                *[a.write(h, g) for a, g in zip(arrays_h, grads[1:])])

    _, dx, *state = tf.while_loop(
        lambda h, *_: h < num_heads, body,
        (start, tf.zeros_like(x), *totals, *arrays), parallel_iterations=1)
    total = state[0] if totals else None
    return total, dx, [a.stack() for a in state[len(totals):]]
