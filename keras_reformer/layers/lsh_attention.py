"""LSHAttention: shared-QK LSH self-attention, a drop-in for self-attention MHA."""

import random

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

# Keras exposes these mask helpers only under keras.src; MultiHeadAttention
# uses the same two to take over the mask of its query.
from keras.src.backend import get_keras_mask, set_keras_mask

from keras_reformer.ops import lsh
from keras_reformer.ops.random import deterministic_normal

# Seeds of the factor hashes are offset by this so that they never collide
# with each other or with the training stream.
_FACTOR_SEED_STRIDE = 7919


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def _check_num_buckets(num_buckets):
    """None, an even int >= 2, or a pair of even ints >= 2 (factorized)."""
    def ok(n):
        return (
            isinstance(n, int) and not isinstance(n, bool) and n >= 2
            and n % 2 == 0
        )

    if num_buckets is None:
        return None
    if ok(num_buckets):
        return num_buckets
    if (
        isinstance(num_buckets, (list, tuple))
        and len(num_buckets) == 2
        and all(ok(n) for n in num_buckets)
    ):
        return tuple(num_buckets)
    raise ValueError(
        "`num_buckets` must be None (derived from the length), an even "
        "integer >= 2, or a pair of even integers >= 2 for factorized "
        f"hashing. Received: num_buckets={num_buckets!r}"
    )


@keras.saving.register_keras_serializable(package="keras_reformer")
class LSHAttention(keras.layers.Layer):
    """Shared-QK locality-sensitive-hashing self-attention (Reformer).

    Each head projects the input once to `qk` (queries; keys are the
    unit-normalised queries) and once to values. Positions are hashed into
    buckets by random rotations, `argmax([xR; -xR])`, sorted by (bucket,
    position) and cut into chunks of `bucket_size`; each chunk attends to
    itself, `num_chunks_before` earlier and `num_chunks_after` later chunks.
    This is repeated for `num_hashes` independent rotations and the rounds
    are combined with their logsumexp weights. Cost per layer is
    O(length * num_hashes * bucket_size) instead of O(length ** 2).

    With `use_causal_mask=True` a query attends to the most recent
    `num_chunks_before * bucket_size` keys of its own bucket (in every
    round), never to later positions: unlike chunk windows, whose boundaries
    move with the buckets of later tokens, this keeps every output strictly
    independent of the tokens after it.

    Masks are compared on original positions: causal, padding (Keras mask
    or `attention_mask`) and self (a query attends to itself only when
    nothing else is allowed). Padding positions get a bucket of their own,
    so they never take a chunk slot from a real token: appending padding
    does not change real outputs. Lengths that are not a multiple of
    `bucket_size` are padded inside the layer.

    In training the rotations are drawn afresh at every call; with
    `training=False` they are fixed by `seed`, so inference is deterministic,
    also under XLA and in an exported SavedModel.

    The constructor and call follow `keras.layers.MultiHeadAttention` for
    self-attention: `layer(x)`, `layer(x, x)`, `layer(query=x, value=x)`,
    `attention_mask=`, `use_causal_mask=`, `training=`. Cross-attention (a
    `value` other than the query) is refused.

    Args:
        num_heads: number of attention heads.
        key_dim: width of each head's shared query/key.
        value_dim: width of each head's value; defaults to `key_dim`.
        dropout: dropout rate on the attention probabilities.
        use_bias: whether the projections have biases.
        output_shape: last dimension of the output; defaults to the input's.
        bucket_size: chunk length (the paper's `c`), default 64.
        num_hashes: hash rounds; may be changed after training (attribute
            or call argument), e.g. raised for evaluation.
        num_buckets: None (derived: about `2 * length / bucket_size`, even;
            factorized into two hashes above `factorize_above` buckets), an
            even int, or a pair of even ints `(b1, b2)` for factorized
            hashing with `b1 * b2` buckets.
        num_chunks_before: earlier chunks each chunk attends to (default 1).
        num_chunks_after: later chunks each chunk attends to (default 0).
        factorize_above: bucket count above which derived counts are
            factorized (default 256).
        seed: seeds the inference rotations and the training stream. If
            None, one is drawn now and stored in the config.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: as in `MultiHeadAttention`.

    Example:

    >>> import keras, keras_reformer as kr
    >>> x = keras.random.normal((2, 1000, 128))
    >>> layer = kr.layers.LSHAttention(num_heads=4, key_dim=32, bucket_size=32)
    >>> layer(x, use_causal_mask=True).shape
    TensorShape([2, 1000, 128])
    """

    def __init__(
        self,
        num_heads,
        key_dim,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        bucket_size=64,
        num_hashes=2,
        num_buckets=None,
        num_chunks_before=1,
        num_chunks_after=0,
        factorize_above=lsh.DEFAULT_FACTORIZE_ABOVE,
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
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        self.num_heads = _positive_int("num_heads", num_heads)
        self.key_dim = _positive_int("key_dim", key_dim)
        self.value_dim = (
            self.key_dim
            if value_dim is None
            else _positive_int("value_dim", value_dim)
        )
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(
                f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}"
            )
        self.dropout = float(dropout)
        self.use_bias = bool(use_bias)
        if output_shape is not None:
            if isinstance(output_shape, (list, tuple)) and len(output_shape) == 1:
                output_shape = output_shape[0]
            output_shape = _positive_int("output_shape", output_shape)
        self._output_dim = output_shape
        self.bucket_size = _positive_int("bucket_size", bucket_size)
        self.num_hashes = num_hashes  # validated by the property setter
        self.num_buckets = _check_num_buckets(num_buckets)
        for name, value in (
            ("num_chunks_before", num_chunks_before),
            ("num_chunks_after", num_chunks_after),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"`{name}` must be a non-negative integer. "
                    f"Received: {name}={value!r}"
                )
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after
        self.factorize_above = _positive_int("factorize_above", factorize_above)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        if seed is None:
            seed = random.randint(0, 2**30)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"`seed` must be None or a non-negative integer. Received: seed={seed!r}"
            )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def num_hashes(self):
        return self._num_hashes

    @num_hashes.setter
    def num_hashes(self, value):
        self._num_hashes = _positive_int("num_hashes", value)

    def _sublayer_kwargs(self):
        def clone(initializer):
            # A fresh initializer per sublayer, or they would draw the same values.
            return initializer.__class__.from_config(initializer.get_config())

        return dict(
            kernel_initializer=clone(self.kernel_initializer),
            bias_initializer=clone(self.bias_initializer),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
        )

    def build(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        if len(query_shape) != 3:
            raise ValueError(
                "LSHAttention expects `query` of rank 3 (batch, length, "
                f"features). Received: query_shape={query_shape}"
            )
        if query_shape[-1] is None:
            raise ValueError(
                "The last dimension of `query` must be known. "
                f"Received: query_shape={query_shape}"
            )
        for name, shape in (("value", value_shape), ("key", key_shape)):
            if shape is not None and tuple(shape)[-1] != query_shape[-1]:
                raise ValueError(
                    f"`{name}` must be the query itself (self-attention); its "
                    f"feature size differs. Received: {name}_shape="
                    f"{tuple(shape)}, query_shape={query_shape}"
                )
        features = query_shape[-1]
        self._input_dim = features
        bias = "de" if self.use_bias else None
        self.qk_dense = keras.layers.EinsumDense(
            "abc,cde->abde",
            output_shape=(None, self.num_heads, self.key_dim),
            bias_axes=bias,
            name="qk",
            **self._sublayer_kwargs(),
        )
        self.qk_dense.build(query_shape)
        self.value_dense = keras.layers.EinsumDense(
            "abc,cde->abde",
            output_shape=(None, self.num_heads, self.value_dim),
            bias_axes=bias,
            name="value",
            **self._sublayer_kwargs(),
        )
        self.value_dense.build(query_shape)
        out_dim = self._output_dim or features
        self.output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",
            output_shape=(None, out_dim),
            bias_axes="e" if self.use_bias else None,
            name="attention_output",
            **self._sublayer_kwargs(),
        )
        self.output_dense.build(
            (query_shape[0], query_shape[1], self.num_heads, self.value_dim)
        )
        self.built = True

    # ------------------------------------------------------------------ call

    def _rotations(self, factors, num_hashes, training):
        """One (key_dim, num_hashes, n / 2) rotation per bucket factor."""
        if training:
            # Fresh every step; replayable by StatelessScope (state mapping).
            base = tf.cast(self.seed_generator.next(), tf.int32)
        else:
            base = tf.constant([self.seed, 0], tf.int32)
        rotations = []
        for i, n in enumerate(factors):
            seed = base + tf.constant([_FACTOR_SEED_STRIDE * (i + 1), 0], tf.int32)
            shape = tf.stack([self.key_dim, num_hashes, n // 2])
            rotations.append(deterministic_normal(shape, seed))
        return rotations

    def _hash(self, qk, padded_length, num_hashes, training):
        """Buckets (B, H, R, L) and the total bucket count."""
        if self.num_buckets is not None:
            factors = (
                self.num_buckets
                if isinstance(self.num_buckets, tuple)
                else (self.num_buckets,)
            )
            buckets = lsh.hash_vectors(
                qk, self._rotations(factors, num_hashes, training)
            )
            total = 1
            for n in factors:
                total *= n
            return buckets, total
        n = lsh.derived_num_buckets(padded_length, self.bucket_size)
        pair = lsh.factor_num_buckets(n)
        if isinstance(n, int):
            if n <= self.factorize_above:
                rotations = self._rotations((n,), num_hashes, training)
                return lsh.hash_vectors(qk, rotations), n
            rotations = self._rotations(pair, num_hashes, training)
            return lsh.hash_vectors(qk, rotations), pair[0] * pair[1]
        # Dynamic length (e.g. a SavedModel serving any length): choose at
        # run time, with rotations drawn outside the cond.
        single = self._rotations((n,), num_hashes, training)
        factored = self._rotations(pair, num_hashes, training)
        buckets = tf.cond(
            n <= self.factorize_above,
            lambda: lsh.hash_vectors(qk, single),
            lambda: lsh.hash_vectors(qk, factored),
        )
        total = tf.where(n <= self.factorize_above, n, pair[0] * pair[1])
        return buckets, total

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
        num_hashes=None,
    ):
        for name, other in (("value", value), ("key", key)):
            if other is not None and other is not query:
                raise ValueError(
                    f"LSHAttention is self-attention with shared queries and "
                    f"keys: `{name}` must be omitted or be the query tensor "
                    "itself. Cross-attention is not supported; use "
                    "keras.layers.MultiHeadAttention for it."
                )
        if return_attention_scores:
            raise ValueError(
                "LSHAttention never forms the dense attention matrix, so "
                "`return_attention_scores=True` is not supported."
            )
        num_hashes = self.num_hashes if num_hashes is None else _positive_int(
            "num_hashes", num_hashes
        )
        if query_mask is None:
            query_mask = get_keras_mask(query)

        x = query
        if len(x.shape) != 3 or x.shape[-1] != self._input_dim:
            raise ValueError(
                "LSHAttention expects `query` of shape (batch, length, "
                f"{self._input_dim}), the shape it was built for. Received: "
                f"query.shape={tuple(x.shape)}"
            )
        # The mask is consumed here; the projections must not see it.
        set_keras_mask(x, None)
        batch = tf.shape(x)[0]
        length = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
        c = self.bucket_size
        padded_length = -(-length // c) * c
        pad = padded_length - length

        valid = tf.ones([batch, length], tf.bool)
        if query_mask is not None:
            valid = tf.logical_and(valid, tf.cast(query_mask, tf.bool))
        pair_allowed = None
        if attention_mask is not None:
            attention_mask = tf.cast(attention_mask, tf.bool)
            rank = len(attention_mask.shape)
            if rank == 2:
                valid = tf.logical_and(valid, attention_mask)
            elif rank == 3 and attention_mask.shape[1] == 1:
                valid = tf.logical_and(valid, attention_mask[:, 0, :])
            elif rank == 3:
                pair_allowed = tf.pad(attention_mask, [[0, 0], [0, pad], [0, pad]])
            else:
                raise ValueError(
                    "`attention_mask` must have shape (batch, length), "
                    "(batch, 1, length) or (batch, length, length). "
                    f"Received: attention_mask.shape={attention_mask.shape}"
                )

        qk = tf.cast(self.qk_dense(x), tf.float32)  # (B, L, H, D)
        v = tf.cast(self.value_dense(x), tf.float32)  # (B, L, H, E)
        qk = tf.transpose(tf.pad(qk, [[0, 0], [0, pad], [0, 0], [0, 0]]), [0, 2, 1, 3])
        v = tf.transpose(tf.pad(v, [[0, 0], [0, pad], [0, 0], [0, 0]]), [0, 2, 1, 3])
        valid = tf.pad(valid, [[0, 0], [0, pad]], constant_values=False)

        rate, dropout_seed = 0.0, None
        if self.dropout > 0 and training:
            # A stateless mask from a seed of the layer's generator: the same
            # seed state (e.g. replayed by a reversible stack) gives the same mask.
            rate = self.dropout
            dropout_seed = tf.cast(self.seed_generator.next(), tf.int32)
        causal = bool(use_causal_mask)

        def dense():
            return lsh.dense_attend(
                qk, v, valid, causal=causal, pair_allowed=pair_allowed,
                dropout_rate=rate, dropout_seed=dropout_seed,
            )

        def hashed():
            buckets, total = self._hash(qk, padded_length, num_hashes, training)
            return lsh.lsh_attend(
                qk, v, buckets, total, valid,
                bucket_size=c,
                chunks_before=self.num_chunks_before,
                chunks_after=self.num_chunks_after,
                causal=causal,
                pair_allowed=pair_allowed,
                dropout_rate=rate,
                dropout_seed=dropout_seed,
            )

        covers = lsh.window_covers_all(
            padded_length // c, self.num_chunks_before, self.num_chunks_after,
            causal,
        )
        if isinstance(covers, bool):
            out = dense() if covers else hashed()
        else:
            out = tf.cond(covers, dense, hashed)  # length known only at run time
        out = tf.transpose(out, [0, 2, 1, 3])[:, :length]
        return self.output_dense(tf.cast(out, self.compute_dtype))

    def compute_mask(self, query, value=None, key=None, query_mask=None,
                     value_mask=None, key_mask=None, **kwargs):
        return query_mask

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        return query_shape[:-1] + (self._output_dim or query_shape[-1],)

    def compute_output_spec(self, query, value=None, key=None, **kwargs):
        return keras.KerasTensor(
            self.compute_output_shape(query.shape), dtype=self.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_shape": self._output_dim,
                "bucket_size": self.bucket_size,
                "num_hashes": self.num_hashes,
                "num_buckets": self.num_buckets,
                "num_chunks_before": self.num_chunks_before,
                "num_chunks_after": self.num_chunks_after,
                "factorize_above": self.factorize_above,
                "kernel_initializer": initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer),
                "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": regularizers.serialize(
                    self.activity_regularizer
                ),
                "kernel_constraint": constraints.serialize(self.kernel_constraint),
                "bias_constraint": constraints.serialize(self.bias_constraint),
                "seed": self.seed,
            }
        )
        return config
