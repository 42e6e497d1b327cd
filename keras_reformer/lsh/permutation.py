"""Rows moved into each hash round's sorted order and back.

The gradient of a gather is a scatter-add, slow on CPU. These gathers use
permutations whose inverse is known (`sorting.sort_order`), so their
gradients are gathers too. The permutations are arguments, not closures, so
that TF's custom-gradient check does not trace them back to the projection
weights.

Shapes: `rows` (batch, head) rows, R rounds, L positions.
"""

import tensorflow as tf


def gather_rounds(x, order, inverse):
    """x (rows, L, ...) -> (rows, R, L, ...) in each round's sorted order.

    Gradient: the upstream gathered back by `inverse`, summed over rounds.
    """

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            back = tf.gather(upstream, inverse, axis=2, batch_dims=2)
            return tf.reduce_sum(back, axis=1), None, None

        return tf.gather(x, order, axis=1, batch_dims=1), grad

    with tf.name_scope("lsh_gather"):  # scopes name the profile's categories
        return forward(x, order, inverse)


def unsort_rounds(x, order, inverse):
    """x (rows, R, L, ...) in sorted order -> original order (gradient: gather)."""

    @tf.custom_gradient
    def forward(x, order, inverse):
        def grad(upstream):
            return tf.gather(upstream, order, axis=2, batch_dims=2), None, None

        return tf.gather(x, inverse, axis=2, batch_dims=2), grad

    with tf.name_scope("lsh_unsort"):
        return forward(x, order, inverse)
