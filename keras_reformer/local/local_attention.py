"""LocalAttention: chunked local self-attention."""

import string

import keras
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer._compat import get_keras_mask, set_keras_mask
from keras_reformer._dense_arguments import (
    dense_arguments_config,
    set_dense_arguments,
    sublayer_arguments,
)
from keras_reformer._seeds import SeedStatesInWeights, resolve_seed
from keras_reformer._self_attention import SelfAttentionCall
from keras_reformer.local import decoding, windows
from keras_reformer.lsh import masks, scores
from keras_reformer.lsh.lsh_attention import Folded
from keras_reformer.ops.dropout import dropout as stateless_dropout


@keras.saving.register_keras_serializable(package="keras_reformer")
class LocalAttention(SelfAttentionCall, SeedStatesInWeights, keras.layers.Layer):
    """Chunked local self-attention.

    The sequence is cut into chunks of `chunk_length` positions; the
    queries of a chunk attend to the keys of their own chunk,
    `num_chunks_before` earlier and `num_chunks_after` later chunks, with
    separate query, key and value projections and scaled dot-product scores.
    Cost per layer is O(length * window) with `window = (num_chunks_before
    + 1 + num_chunks_after) * chunk_length`. Windows stop at the ends of the
    sequence (they never wrap around). A sequence not a multiple of
    `chunk_length` is padded to one internally; the extra keys are masked.

    Reformer models interleave it with `LSHAttention`: local layers see the
    neighbourhood exactly, hashed layers reach far.

    Masks mean what they mean in `MultiHeadAttention` (`query_mask`,
    `value_mask`, `key_mask`, the query's Keras mask, `attention_mask` and
    `use_causal_mask`), restricted to the window: a key outside a query's
    window is never attended to. Chunks are fixed by position, so padding
    at the end of a sequence never changes the outputs at its real
    positions; padding elsewhere moves the chunk boundaries. Causal outputs
    depend only on earlier positions, so cached decoding (`init_cache`,
    `call_with_cache`) gives the full pass's outputs exactly. A query whose
    window holds no allowed key attends to nothing: its attention output is
    zero (the output projection's bias alone).

    Args:
        num_heads: int, number of attention heads.
        key_dim: int, width of each head's query and key.
        value_dim: int, width of each head's value; defaults to `key_dim`.
        chunk_length: int, positions per chunk (default 64).
        num_chunks_before: int, earlier chunks each chunk attends to
            (default 1).
        num_chunks_after: int, later chunks each chunk attends to (default
            0; they are masked anyway in causal attention).
        dropout: float, dropout rate on the attention probabilities.
        use_bias: bool, whether the projections have biases.
        output_shape: int or tuple, the trailing output shape; defaults to
            the query's last dimension.
        seed: int or None, seeds the dropout (None: drawn, kept in the config).
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: as in `MultiHeadAttention`.

    Call arguments:
        query: tensor of shape `(B, T, dim)`.
        value, key: omitted or the query itself; cross-attention is refused.
        query_mask, value_mask, key_mask: optional `(B, T)` boolean masks.
        attention_mask: optional boolean mask broadcastable to
            `(B, num_heads, T, T)`, as in `MultiHeadAttention`.
        use_causal_mask: bool, no query attends to later positions.
        training: bool, dropout when True.

    Returns:
        Tensor of shape `(B, T) + output_shape`, carrying the query's Keras
        mask.

    Example:

    >>> import keras, keras_reformer as kr
    >>> x = keras.random.normal((2, 1000, 128))
    >>> layer = kr.layers.LocalAttention(num_heads=4, key_dim=32, chunk_length=64)
    >>> layer(x, use_causal_mask=True).shape
    TensorShape([2, 1000, 128])
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        chunk_length=64,
        num_chunks_before=1,
        num_chunks_after=0,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        **kwargs,
    ):
        heads = self._checked_heads(num_heads, key_dim, value_dim)
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        self.num_heads, self.key_dim, self.value_dim = heads
        self.chunk_length = _checks.positive_int("chunk_length", chunk_length)
        self.num_chunks_before = _checks.non_negative_int(
            "num_chunks_before", num_chunks_before
        )
        self.num_chunks_after = _checks.non_negative_int(
            "num_chunks_after", num_chunks_after
        )
        self.dropout = _checks.rate("dropout", dropout)
        self.use_bias = _checks.boolean("use_bias", use_bias)
        self._output_shape = _checks.output_shape(output_shape)
        set_dense_arguments(self, kernel_initializer, bias_initializer,
                            kernel_regularizer, bias_regularizer, kernel_constraint,
                            bias_constraint)
        self.seed = resolve_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    def build(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        if len(query_shape) != 3 or query_shape[-1] is None:
            raise ValueError(
                "LocalAttention expects `query` of shape (batch, length, "
                "features) with known features. "
                f"Received: query_shape={query_shape}"
            )
        for name, shape in (("value", value_shape), ("key", key_shape)):
            if shape is not None and tuple(shape) != query_shape:
                raise ValueError(
                    f"`{name}` must be the query itself (self-attention); its "
                    f"shape differs. Received: {name}_shape={tuple(shape)}, "
                    f"query_shape={query_shape}"
                )
        features = query_shape[-1]
        self._input_dim = features
        bias = "de" if self.use_bias else None

        def heads_dense(name, width, offset):
            dense = keras.layers.EinsumDense(
                "abc,cde->abde", output_shape=(None, self.num_heads, width),
                bias_axes=bias, name=name, **sublayer_arguments(self, offset),
            )
            dense.build(query_shape)
            return dense

        self.query_dense = heads_dense("query", self.key_dim, 0)
        self.key_dense = heads_dense("key", self.key_dim, 1)
        self.value_dense = heads_dense("value", self.value_dim, 2)
        out_shape = self._output_shape or (features,)
        letters = string.ascii_lowercase[4:4 + len(out_shape)]
        self.output_dense = keras.layers.EinsumDense(
            f"abcd,cd{letters}->ab{letters}",
            output_shape=(None,) + out_shape,
            bias_axes=letters if self.use_bias else None,
            name="attention_output",
            **sublayer_arguments(self, 3),
        )
        self.output_dense.build((None, query_shape[1], self.num_heads, self.value_dim))
        self.built = True

    # ------------------------------------------------------------ the parts

    def project(self, x):
        """(B, L, features) -> queries, keys (B, H, L, key_dim) and values
        (B, H, L, value_dim), float32; the queries scaled by key_dim ** -0.5."""

        def heads(dense):
            return tf.transpose(tf.cast(dense(x), tf.float32), [0, 2, 1, 3])

        scale = tf.math.rsqrt(tf.constant(self.key_dim, tf.float32))
        return heads(self.query_dense) * scale, heads(self.key_dense), heads(
            self.value_dense)

    def attend_output(self, out):
        """Attention output (B, H, L, E) float32 -> (B, L, *output_shape)."""
        out = tf.cast(tf.transpose(out, [0, 2, 1, 3]), self.compute_dtype)
        return self.output_dense(out)

    # ------------------------------------------------------ cached decoding

    def inference_rotations(self, num_hashes=None):
        """None: local attention hashes nothing (the cached-decoding protocol
        it shares with `LSHAttention`)."""
        return None

    def init_cache(self, query, padding_mask, max_length=None):
        """The decoding cache after a causal pass over `query`.

        Args:
            query: (B, P, features), the layer's input over the prompts.
            padding_mask: (B, P) bool, True on each row's first positions
                (its prompt; prompts are right-padded).
            max_length: unused (the cache holds one window, whatever the
                length); accepted for the protocol `LSHAttention` shares.

        Returns:
            The cache (`local.decoding.init_cache`) for `call_with_cache`.
        """
        del max_length
        _, k, v = self.project(query)
        return decoding.init_cache(
            k, v, padding_mask, self.chunk_length, self.num_chunks_before
        )

    def call_with_cache(self, query, cache, position, rotations=None, in_place=False):
        """Causal attention of one new position per row, from the cache:
        the layer's causal output at `position` (no dropout).

        Args:
            query: (B, 1, features), the layer's input at the new position.
            cache: from `init_cache` or a previous call.
            position: (B,) int32, the new position of each row.
            rotations, in_place: unused (no hashing; the cache is one window,
                rewritten whole).

        Returns:
            (output (B, 1, *output_shape), updated cache).
        """
        del rotations, in_place
        q, k, v = self.project(query)
        out, cache = decoding.decode_step(
            cache, q[:, :, 0], k[:, :, 0], v[:, :, 0], position,
            self.chunk_length, self.num_chunks_before,
        )
        return self.attend_output(out[:, :, None]), cache

    # ------------------------------------------------------------------ call

    def call(
        self,
        query,
        value=None,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        # `__call__` forwards only the query and refuses attention scores.
        del value, key, return_attention_scores
        if query_mask is None:
            query_mask = get_keras_mask(query)
        x = query
        if len(x.shape) != 3 or x.shape[-1] != self._input_dim:
            raise ValueError(
                f"LocalAttention expects `query` of shape (batch, length, "
                f"{self._input_dim}), the features it was built for. "
                f"Received: query.shape={tuple(x.shape)}"
            )
        set_keras_mask(x, None)  # consumed here; the projections must not see it
        causal = bool(use_causal_mask)
        batch = tf.shape(x)[0]
        length = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
        q, k, v = self.project(x)

        query_key_mask = None
        if attention_mask is not None:
            # A rank-3 input is already (batch, length): the identity fold.
            query_key_mask = masks.broadcast_query_key_mask(
                attention_mask, Folded(x, ((0,), (1,))), self.num_heads
            )
        valid, _ = masks.valid_keys(
            (query_mask, value_mask, key_mask), query_key_mask, batch, length, causal
        )

        c = self.chunk_length
        pad = -length % c
        padded = not (isinstance(pad, int) and pad == 0)
        if padded:
            q, k, v = (tf.pad(t, [[0, 0], [0, 0], [0, pad], [0, 0]]) for t in (q, k, v))
            valid = tf.pad(valid, [[0, 0], [0, pad]], constant_values=False)
            if query_key_mask is not None:
                query_key_mask = tf.pad(
                    query_key_mask, [[0, 0], [0, 0], [0, pad], [0, pad]])

        # A sequence of one chunk has no neighbours to look at.
        single = isinstance(length, int) and length <= c
        before = 0 if single else self.num_chunks_before
        after = 0 if single else self.num_chunks_after
        allowed = windows.window_mask(valid, c, before, after, causal, query_key_mask)
        keys = windows.windows(windows.to_chunks(k, c), before, after)
        values = windows.windows(windows.to_chunks(v, c), before, after)
        logits = tf.einsum("bhncd,bhnwd->bhncw", windows.to_chunks(q, c), keys)
        logits = tf.where(allowed, logits, scores.MASK_VALUE)
        weights = tf.nn.softmax(logits, axis=-1)
        rate, seed = self._dropout(training)
        if rate:
            weights = stateless_dropout(weights, rate, seed)
        # No allowed key, no output (the softmax of masked logits is uniform).
        weights = weights * tf.cast(tf.reduce_any(allowed, -1, keepdims=True), weights.dtype)
        out = windows.from_chunks(tf.einsum("bhncw,bhnwe->bhnce", weights, values))
        if padded:
            out = out[:, :, :length]
        out = self.attend_output(out)
        if query_mask is not None:
            set_keras_mask(out, query_mask)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "chunk_length": self.chunk_length,
                "num_chunks_before": self.num_chunks_before,
                "num_chunks_after": self.num_chunks_after,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_shape": self._output_shape,
                **dense_arguments_config(self),
                "seed": self.seed,
            }
        )
        return config
