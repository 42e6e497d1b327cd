"""Reformer blocks written as a user would write them (LayerNorm and a
library layer in a `keras.layers.Layer`), shared by the tests of
`ReversibleSequence` and its loops."""

import keras

from keras_reformer.layers import ChunkedFeedForward, LSHAttention

PACKAGE = "keras_reformer_tests"


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionBlock(keras.layers.Layer):
    """F: LayerNorm -> causal LSHAttention, taking the Keras padding mask."""

    def __init__(self, dropout=0.1, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.dropout, self.seed = dropout, seed
        self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)
        self.attention = LSHAttention(
            num_heads=2, key_dim=4, bucket_size=4, num_hashes=2,
            dropout=dropout, seed=seed, dtype=self.dtype_policy,
        )

    def build(self, shape):
        # Built from its sublayers' shapes, as a Keras layer should be. A
        # block without build() and compute_output_shape() is traced to
        # build it (UserAttentionBlock below); most tests here do not need
        # that second of CPU per block.
        self.attention(self.norm(keras.KerasTensor(shape)))

    def compute_output_shape(self, shape):
        return shape

    def call(self, x, mask=None, training=None):
        return self.attention(
            self.norm(x), query_mask=mask, training=training,
            use_causal_mask=True,
        )

    def get_config(self):
        return {**super().get_config(), "dropout": self.dropout, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeedForwardBlock(keras.layers.Layer):
    """G: LayerNorm -> ChunkedFeedForward -> Dropout."""

    def __init__(self, dropout=0.1, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.dropout, self.seed = dropout, seed
        self.norm = keras.layers.LayerNormalization(dtype=self.dtype_policy)
        self.ffn = ChunkedFeedForward(
            16, dropout=dropout, chunk_size=5, seed=seed, dtype=self.dtype_policy
        )
        self.drop = keras.layers.Dropout(dropout, seed=seed + 1)

    def build(self, shape):
        self.ffn(self.norm(keras.KerasTensor(shape)))

    def compute_output_shape(self, shape):
        return shape

    def call(self, x, training=None):
        return self.drop(self.ffn(self.norm(x), training=training), training=training)

    def get_config(self):
        return {**super().get_config(), "dropout": self.dropout, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class UserAttentionBlock(AttentionBlock):
    """AttentionBlock as users often write it: no build() and no
    compute_output_shape(), so ReversibleSequence.build traces its call."""

    build = keras.layers.Layer.build
    compute_output_shape = keras.layers.Layer.compute_output_shape
