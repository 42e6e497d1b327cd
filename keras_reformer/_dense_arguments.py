"""The config of the `Dense`-style arguments (initializers, regularizers,
constraints) that the library's layers take with Keras' names and meanings."""

from keras import constraints, initializers, regularizers


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
