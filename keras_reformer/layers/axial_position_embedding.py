"""AxialPositionEmbedding: learned positions for very long inputs, factored."""

import math

import keras
import tensorflow as tf
from keras import initializers


def default_axial_shape(max_sequence_length):
    """(l1, l2) with l1 a power of two near sqrt(max) and l1 * l2 >= max."""
    first = 2 ** max(0, int(math.floor(math.log2(math.sqrt(max_sequence_length)))))
    return first, -(-max_sequence_length // first)


def _check_pair(name, value):
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                   for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a pair of positive integers. Received: "
            f"{name}={value!r}"
        )
    return tuple(value)


@keras.saving.register_keras_serializable(package="keras_reformer")
class AxialPositionEmbedding(keras.layers.Layer):
    """Axial (factorized) learned position embeddings (Reformer section 5).

    Position `p = i * l2 + j` of an `(l1, l2)` grid gets the concatenation of
    `E1[i]` (width `d1`) and `E2[j]` (width `d2`), with `d1 + d2` the input's
    feature size. Parameters: `l1 * d1 + l2 * d2`, not `l1 * l2 * d` (for
    `axial_shape=(128, 512)`, 64K positions, and width 256 split in halves:
    81,920 instead of 16.8 million).

    Called on `(batch, length, features)` inputs, returns the position
    embeddings broadcast to that shape (add them yourself, as with keras-hub's
    `PositionEmbedding`). Any length up to `max_sequence_length` works;
    shorter inputs take the first positions. Inputs longer than `max_sequence_length` (even where
    the grid `l1 * l2` is larger) raise a `ValueError` when the length is
    static and an `InvalidArgumentError` at run time otherwise (XLA drops
    run-time assertions: under `jit_compile=True` only the static check runs).

    Args:
        max_sequence_length: the longest input; used to derive `axial_shape`.
        axial_shape: `(l1, l2)` with `l1 * l2 >= max_sequence_length`.
            Default: `l1` the power of two nearest below `sqrt(max)`.
        axial_dims: `(d1, d2)` summing to the feature size. Default: halves.
        initializer: of both tables (default: normal, stddev 0.02).

    Example:

    >>> import keras, keras_reformer as kr
    >>> layer = kr.layers.AxialPositionEmbedding(65536, axial_shape=(128, 512))
    >>> x = keras.random.normal((2, 1000, 256))
    >>> (x + layer(x)).shape
    TensorShape([2, 1000, 256])
    >>> layer.count_params()
    81920
    """

    def __init__(self, max_sequence_length, axial_shape=None, axial_dims=None,
                 initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(
                "`max_sequence_length` must be a positive integer. Received: "
                f"max_sequence_length={max_sequence_length!r}"
            )
        self.max_sequence_length = max_sequence_length
        if axial_shape is None:
            axial_shape = default_axial_shape(max_sequence_length)
        self.axial_shape = _check_pair("axial_shape", axial_shape)
        if self.axial_shape[0] * self.axial_shape[1] < max_sequence_length:
            raise ValueError(
                "`axial_shape` must cover `max_sequence_length` "
                f"(l1 * l2 >= max). Received: axial_shape={self.axial_shape}, "
                f"max_sequence_length={max_sequence_length}"
            )
        self.axial_dims = None if axial_dims is None else _check_pair(
            "axial_dims", axial_dims
        )
        if initializer == "random_normal":
            initializer = initializers.RandomNormal(stddev=0.02)
        self.initializer = initializers.get(initializer)
        self.supports_masking = True

    def build(self, input_shape):
        features = input_shape[-1]
        if features is None:
            raise ValueError(
                "AxialPositionEmbedding needs a known feature size. "
                f"Received: input_shape={input_shape}"
            )
        dims = self.axial_dims or (features // 2, features - features // 2)
        if sum(dims) != features:
            raise ValueError(
                "`axial_dims` must sum to the input's feature size. Received: "
                f"axial_dims={self.axial_dims}, features={features}"
            )
        self._dims = dims
        self.first = self.add_weight(
            shape=(self.axial_shape[0], dims[0]), initializer=self.initializer,
            name="first_axis",
        )
        self.second = self.add_weight(
            shape=(self.axial_shape[1], dims[1]), initializer=self.initializer,
            name="second_axis",
        )

    def call(self, inputs):
        length = inputs.shape[1]
        limit = self.max_sequence_length
        message = (
            f"exceeds the axial maximum: max_sequence_length={limit} "
            f"(axial_shape={self.axial_shape}). Build the layer with a larger "
            "`max_sequence_length`/`axial_shape`."
        )
        if length is not None and length > limit:
            raise ValueError(f"Input length {length} {message}")
        if length is None:
            length = tf.shape(inputs)[1]
            with tf.control_dependencies([
                tf.debugging.assert_less_equal(
                    length, limit, message=f"Input length {message}"
                )
            ]):
                length = tf.identity(length)
        positions = tf.range(length)
        first = tf.gather(self.first, positions // self.axial_shape[1])
        second = tf.gather(self.second, positions % self.axial_shape[1])
        table = tf.cast(tf.concat([first, second], axis=-1), self.compute_dtype)
        return tf.broadcast_to(table[None], tf.shape(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_sequence_length": self.max_sequence_length,
                "axial_shape": self.axial_shape,
                "axial_dims": self.axial_dims,
                "initializer": initializers.serialize(self.initializer),
            }
        )
        return config
