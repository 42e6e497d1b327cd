"""AxialPositionEmbedding: learned positions for very long inputs, factored."""

import math

import keras
import tensorflow as tf
from keras import initializers

from keras_reformer import _checks
from keras_reformer._seeds import fresh_initializer
from keras_reformer.ops import axial


def default_axial_shape(max_sequence_length):
    """(l1, l2) with l1 a power of two near sqrt(max) and l1 * l2 >= max."""
    first = 2 ** max(0, int(math.floor(math.log2(math.sqrt(max_sequence_length)))))
    return first, -(-max_sequence_length // first)


@keras.saving.register_keras_serializable(package="keras_reformer")
class AxialPositionEmbedding(keras.layers.Layer):
    """Axial (factorized) learned position embeddings (Reformer section 5).

    Position `p = i * l2 + j` of an `(l1, l2)` grid gets the concatenation of
    `E1[i]` (width `d1`) and `E2[j]` (width `d2`), with `d1 + d2` the input's
    feature size. Parameters: `l1 * d1 + l2 * d2`, not `l1 * l2 * d` (for
    `axial_shape=(128, 512)`, 64K positions, and width 256 split in halves:
    81,920 instead of 16.8 million).

    The layer returns the position embeddings broadcast to the input's shape;
    add them yourself, as with keras-hub's `PositionEmbedding`. Any length up
    to `max_sequence_length` works; shorter inputs take the first positions.

    Args:
        max_sequence_length: int. The longest input accepted. Longer inputs
            (even where the grid `l1 * l2` is larger) raise a `ValueError`
            when the length is static and an `InvalidArgumentError` at run
            time otherwise (XLA drops run-time assertions: under
            `jit_compile=True` only the static check runs).
        axial_shape: tuple of two ints `(l1, l2)` with
            `l1 * l2 >= max_sequence_length`. Defaults to `None`: `l1` the
            power of two nearest below `sqrt(max_sequence_length)`.
        axial_dims: tuple of two ints `(d1, d2)` summing to the input's
            feature size. Defaults to `None`: halves (`d1` the smaller).
        initializer: the initializer of both tables: any value
            `keras.initializers.get` accepts (a name, a config dict or an
            instance). Defaults to `None`, which means
            `keras.initializers.RandomNormal(stddev=0.02)`, the scale
            Transformer position tables commonly use. (The name
            `"random_normal"` gives Keras' own default, stddev 0.05.)
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor of shape `(batch, length, features)`. Only its shape
            and the layer's dtype are used.

    Returns:
        A tensor of the shape of `inputs`, in the layer's compute dtype.

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
                 initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.max_sequence_length = _checks.positive_int(
            "max_sequence_length", max_sequence_length
        )
        if axial_shape is None:
            axial_shape = default_axial_shape(max_sequence_length)
        self.axial_shape = _checks.positive_int_pair("axial_shape", axial_shape)
        if self.axial_shape[0] * self.axial_shape[1] < max_sequence_length:
            raise ValueError(
                "`axial_shape` must cover `max_sequence_length` "
                f"(l1 * l2 >= max). Received: axial_shape={self.axial_shape}, "
                f"max_sequence_length={max_sequence_length}"
            )
        self.axial_dims = None if axial_dims is None else _checks.positive_int_pair(
            "axial_dims", axial_dims
        )
        if initializer is None:
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
        # One initializer per table: a shared one gives both the same values.
        self.first = self.add_weight(
            shape=(self.axial_shape[0], dims[0]),
            initializer=fresh_initializer(self.initializer, 0), name="first_axis",
        )
        self.second = self.add_weight(
            shape=(self.axial_shape[1], dims[1]),
            initializer=fresh_initializer(self.initializer, 1), name="second_axis",
        )

    def call(self, inputs):
        length = _checks.sequence_length(
            inputs, self.max_sequence_length,
            f"exceeds the axial maximum: max_sequence_length="
            f"{self.max_sequence_length} (axial_shape={self.axial_shape}). Build "
            "the layer with a larger `max_sequence_length`/`axial_shape`.",
        )
        return axial.axial_positions(
            tf.convert_to_tensor(self.first), tf.convert_to_tensor(self.second),
            length, self.axial_shape[1], tf.shape(inputs), self.compute_dtype,
        )

    def embedding_at(self, positions):
        """The embeddings of the given positions (any int32 shape), e.g. one
        per row in cached decoding: `positions.shape + (features,)`, in the
        compute dtype."""
        width = self.axial_shape[1]
        out = tf.concat([tf.gather(self.first, positions // width),
                         tf.gather(self.second, positions % width)], axis=-1)
        return tf.cast(out, self.compute_dtype)

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
