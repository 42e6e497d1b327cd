"""The two halves of a Reformer layer, as blocks for ReversibleSequence."""

import keras
from keras import ops

from keras_reformer import _checks
from keras_reformer._seeds import SEED_LIMIT, resolve_seed

from keras_reformer.layers._dropout import Dropout
from keras_reformer.layers._layer_norm import LayerNorm
from keras_reformer.layers.chunked_feed_forward import ChunkedFeedForward
from keras_reformer.local.local_attention import LocalAttention
from keras_reformer.lsh.lsh_attention import LSHAttention

ATTENTION_TYPES = {"lsh": LSHAttention, "local": LocalAttention}


def _resolve_seed(seed):
    # Always a concrete seed, stored in the config: a Dropout seeded by
    # Keras' global generator could not be replayed by ReversibleSequence.
    # The Dropout takes seed + 1, so the block's own seed stays below the top.
    return resolve_seed(seed) % (SEED_LIMIT - 1)


def _fused_inputs(block, inputs, dy, training):
    """A block's input and upstream gradient as its `value_and_vjp` takes
    them: autocast as Keras' __call__ would, `dy` through the residual
    dropout, and that dropout's mask as a factor (None without dropout).

    The residual dropout is linear: it multiplies its input, and so its
    gradient, by one mask. Drawn once (the forward's, replayed) as
    `dropout(ones)`, it is known before the inner layer's output exists,
    which the inner layer's fused VJP needs.
    """
    x = ops.cast(inputs, block.compute_dtype)
    dy = ops.cast(dy, block.compute_dtype)
    scale = None
    if training and block.dropout.rate > 0:
        scale = block.dropout(ops.ones_like(dy), training=True)
        dy = dy * scale
    return x, dy, scale


def _scaled(outputs, scale):
    return outputs if scale is None else outputs * scale


@keras.saving.register_keras_serializable(package="keras_reformer")
class AttentionBlock(keras.layers.Layer):
    """`F` of a Reformer layer: LayerNorm -> attention -> dropout.

    Takes a padding `mask` (passed by ReversibleSequence) and applies the
    causal mask if `causal`. The attention is `LSHAttention` or
    `LocalAttention` (`attention_type`), built with `attention_kwargs`.

    Args:
        num_heads, key_dim: of the attention.
        causal: mask future positions.
        dropout: residual dropout on the block's output.
        attention_dropout: dropout on attention probabilities.
        seed: seeds the attention and the dropout (None: drawn).
        attention_kwargs: dict of further arguments of the attention layer
            (`bucket_size`, `num_hashes`, ... for "lsh"; `chunk_length`,
            `num_chunks_before`, ... for "local").
        attention_type: "lsh" (default) or "local".
        layer_norm_epsilon: of the LayerNorm (default 1e-6).
    """

    def __init__(self, num_heads, key_dim, causal=True, dropout=0.0,
                 attention_dropout=0.0, seed=None, attention_kwargs=None,
                 attention_type="lsh", layer_norm_epsilon=1e-6, **kwargs):
        _checks.one_of("attention_type", attention_type, tuple(ATTENTION_TYPES))
        super().__init__(**kwargs)
        self.attention_type = attention_type
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_heads, self.key_dim = num_heads, key_dim
        self.causal = bool(causal)
        self.dropout_rate = dropout
        self.attention_dropout = attention_dropout
        seed = self.seed = _resolve_seed(seed)
        self.attention_kwargs = dict(attention_kwargs or {})
        self.norm = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.attention = ATTENTION_TYPES[attention_type](
            num_heads, key_dim, seed=seed, dtype=self.dtype_policy, name="attention",
            # attention_kwargs may set a dropout of its own (the local layers').
            **{"dropout": attention_dropout, **self.attention_kwargs},
        )
        self.dropout = Dropout(
            dropout, seed=seed + 1, dtype=self.dtype_policy
        )
        self.supports_masking = True

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.attention.build(input_shape)
        self.dropout.build(input_shape)

    def call(self, inputs, mask=None, training=None):
        x = self.norm(inputs)
        x = self.attention(
            x, query_mask=mask, use_causal_mask=self.causal, training=training
        )
        return self.dropout(x, training=training)

    def value_and_vjp(self, inputs, dy, mask=None, training=None):
        """The output and its VJP with `dy`, each attention head run once.

        What `ReversibleSequence`'s backward pass calls instead of rerunning
        the block under a tape: the LayerNorm is recorded by the caller's
        tape, the attention gives its output and gradients together where
        it runs its heads one at a time (`LSHAttention.value_and_vjp`).
        Same contract as `FeedForwardBlock.value_and_vjp`.

        Returns:
            `(outputs, targets, target_grads)`.
        """
        fused = getattr(self.attention, "value_and_vjp", None)
        if fused is None:  # LocalAttention: ordinary autodiff via the tape
            outputs = self(inputs, mask=mask, training=training)
            return outputs, [outputs], [ops.cast(dy, outputs.dtype)]
        x, dy, scale = _fused_inputs(self, inputs, dy, training)
        outputs, targets, grads = fused(
            self.norm(x), dy, query_mask=mask, use_causal_mask=self.causal,
            training=training,
        )
        return _scaled(outputs, scale), targets, grads

    def init_cache(self, inputs, padding_mask, max_length):
        """The attention's decoding cache after a causal pass over `inputs`
        (see `LSHAttention.init_cache`, `LocalAttention.init_cache`)."""
        return self.attention.init_cache(self.norm(inputs), padding_mask, max_length)

    def call_with_cache(self, inputs, cache, position, rotations=None, in_place=False):
        """The block at one new position per row, `(B, 1, d)`, from the cache:
        what `call` gives there in inference (see
        `LSHAttention.call_with_cache`). Returns `(output, cache)`."""
        out, cache = self.attention.call_with_cache(
            self.norm(inputs), cache, position, rotations, in_place
        )
        return out, cache  # the residual dropout is the identity in inference

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, key_dim=self.key_dim, causal=self.causal,
            dropout=self.dropout_rate, attention_dropout=self.attention_dropout,
            seed=self.seed, attention_kwargs=self.attention_kwargs,
            attention_type=self.attention_type,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_reformer")
class FeedForwardBlock(keras.layers.Layer):
    """`G` of a Reformer layer: LayerNorm -> ChunkedFeedForward -> dropout.

    Args:
        intermediate_dim: FFN width.
        chunk_size: positions per FFN slice (default 1024, see
            `ChunkedFeedForward`).
        activation: of the FFN (default "gelu").
        dropout: residual dropout (and the FFN's inner dropout).
        seed: seeds the dropouts (None: drawn).
        layer_norm_epsilon: of the LayerNorm (default 1e-6).
    """

    def __init__(self, intermediate_dim, chunk_size=1024, activation="gelu",
                 dropout=0.0, seed=None, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.intermediate_dim = intermediate_dim
        self.chunk_size = chunk_size
        # Kept as Keras' activation object, so a callable (a registered
        # function or keras.activations.*) survives get_config/from_config.
        self.activation = keras.activations.get(activation)
        self.dropout_rate = dropout
        seed = self.seed = _resolve_seed(seed)
        self.norm = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.feed_forward = ChunkedFeedForward(
            intermediate_dim, activation=activation, dropout=dropout,
            chunk_size=chunk_size, seed=seed, dtype=self.dtype_policy,
            name="feed_forward",
        )
        self.dropout = Dropout(
            dropout, seed=seed + 1, dtype=self.dtype_policy
        )
        self.supports_masking = True

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.feed_forward.build(input_shape)
        self.dropout.build(input_shape)

    def call(self, inputs, training=None):
        x = self.feed_forward(self.norm(inputs), training=training)
        return self.dropout(x, training=training)

    def value_and_vjp(self, inputs, dy, training=None):
        """The output and its VJP with `dy`, the FFN's slices in one pass.

        What `ReversibleSequence`'s backward pass calls instead of rerunning
        the block under a tape: the LayerNorm is recorded by the caller's
        tape, the FFN gives its output and gradients together
        (`ChunkedFeedForward.value_and_vjp`). Same contract: run under the
        caller's tape and seed replay, then
        `tape.gradient(targets, sources, output_gradients=target_grads)`.

        Returns:
            `(outputs, targets, target_grads)`.
        """
        x, dy, scale = _fused_inputs(self, inputs, dy, training)
        outputs, targets, grads = self.feed_forward.value_and_vjp(
            self.norm(x), dy, training=training
        )
        return _scaled(outputs, scale), targets, grads

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            intermediate_dim=self.intermediate_dim, chunk_size=self.chunk_size,
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout_rate, seed=self.seed,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
