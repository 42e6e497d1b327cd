"""The config of the `Dense`-style arguments (initializers, regularizers,
constraints) that the library's layers take with Keras' names and meanings."""

from keras import constraints, initializers, regularizers

from keras_reformer._seeds import fresh_initializer


def dense_arguments_config(layer):
    """`get_config` entries for the layer's `kernel_*`/`bias_*` initializers,
    regularizers and constraints and its activity regularizer, serialized
    as `keras.layers.Dense` serializes them."""
    return {
        "kernel_initializer": initializers.serialize(layer.kernel_initializer),
        "bias_initializer": initializers.serialize(layer.bias_initializer),
        "kernel_regularizer": regularizers.serialize(layer.kernel_regularizer),
        "bias_regularizer": regularizers.serialize(layer.bias_regularizer),
        "activity_regularizer": regularizers.serialize(layer.activity_regularizer),
        "kernel_constraint": constraints.serialize(layer.kernel_constraint),
        "bias_constraint": constraints.serialize(layer.bias_constraint),
    }


def set_dense_arguments(layer, kernel_initializer, bias_initializer,
                        kernel_regularizer, bias_regularizer, kernel_constraint,
                        bias_constraint):
    """Resolves the `Dense`-style arguments (names, configs or objects) onto
    `layer` as the attributes `sublayer_arguments` and
    `dense_arguments_config` read."""
    layer.kernel_initializer = initializers.get(kernel_initializer)
    layer.bias_initializer = initializers.get(bias_initializer)
    layer.kernel_regularizer = regularizers.get(kernel_regularizer)
    layer.bias_regularizer = regularizers.get(bias_regularizer)
    layer.kernel_constraint = constraints.get(kernel_constraint)
    layer.bias_constraint = constraints.get(bias_constraint)


def sublayer_arguments(layer, offset=0):
    """The `Dense`-style keyword arguments for one of `layer`'s projections:
    its regularizers and constraints, its dtype policy, and initializers of
    their own (`fresh_initializer(..., offset)`; give each projection its
    own offset, or a seeded initializer would draw the same values twice)."""
    return dict(
        kernel_initializer=fresh_initializer(layer.kernel_initializer, offset),
        bias_initializer=fresh_initializer(layer.bias_initializer, offset),
        kernel_regularizer=layer.kernel_regularizer,
        bias_regularizer=layer.bias_regularizer,
        kernel_constraint=layer.kernel_constraint,
        bias_constraint=layer.bias_constraint,
        dtype=layer.dtype_policy,
    )
