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

    def weights_of(h, weights):
        return [tf.gather(w, h) for w in weights]

    @tf.custom_gradient
    def looped(x, *weights):
        def body(h, total):
            return h + 1, total + tf.cast(head_fn(h, x, *weights_of(h, weights)),
                                          tf.float32)

        zeros = tf.zeros(tf.concat([tf.shape(x)[:-1], [output_dim]], 0), tf.float32)
        zeros = tf.ensure_shape(zeros, x.shape[:-1].concatenate([output_dim]))
        _, total = tf.while_loop(lambda h, _: h < num_heads, body,
                                 (tf.constant(0), zeros), parallel_iterations=1)

        def grad(d_total):
            arrays = [tf.TensorArray(w.dtype, size=num_heads, element_shape=w.shape[1:])
                      for w in weights]
            # In a reversible backward pass the forward loop has just been
            # rerun to rebuild the block's input; run side by side, the two
            # loops would hold two heads' tensors at once.
            with tf.control_dependencies([total]):
                start = tf.constant(0)

            def grad_body(h, dx, *arrays):
                parts = weights_of(h, weights)
                with tf.GradientTape() as tape:
                    tape.watch([x] + parts)
                    out = tf.cast(head_fn(h, x, *parts), tf.float32)
                grads = tape.gradient(out, [x] + parts, output_gradients=d_total)
                return (h + 1, dx + grads[0],
                        *[a.write(h, g) for a, g in zip(arrays, grads[1:])])

            _, dx, *arrays = tf.while_loop(
                lambda h, *_: h < num_heads, grad_body,
                (start, tf.zeros_like(x), *arrays), parallel_iterations=1)
            return [dx] + [a.stack() for a in arrays]

        return total, grad

    return looped(x, *per_head)
