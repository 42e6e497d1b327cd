"""LSHAttention: shared-QK LSH self-attention, a drop-in for self-attention MHA."""

import math
import string
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer._dense_arguments import (
    dense_arguments_config,
    set_dense_arguments,
    sublayer_arguments,
)
from keras_reformer._compat import get_keras_mask, set_keras_mask
from keras_reformer._seeds import SeedStatesInWeights, resolve_seed
from keras_reformer._self_attention import SelfAttentionCall
from keras_reformer.lsh import (
    head_loop,
    chunk_attention,
    decoding,
    dense_attention,
    hashing,
    masks,
    reference_rules,
    rotations,
    sorting,
    value_shift,
)

class _Prepared(NamedTuple):
    """`call`'s input folded to (B, L, F) (`x`), with its masks and settings."""
    folded: "Folded"
    x: tf.Tensor
    valid: tf.Tensor
    length: object  # int, or a scalar tensor where unknown statically
    causal: bool
    query_key_mask: object
    causal_rows: object
    num_hashes: int
    query_mask: object


# When neither `num_buckets`, `max_length` nor a static length is known, the
# bucket count is derived as for this length (64 buckets at bucket_size 64).
DEFAULT_MAX_LENGTH = 2048


def _prod(sizes):
    total = 1
    for size in sizes:
        total = total * size
    return total


def _size(tensor, axis):
    static = tensor.shape[axis]
    return static if static is not None else tf.shape(tensor)[axis]


class Folded:
    """An input `(B, ..., F)` folded to `(B', L, F)` by the layer's
    `attention_axes`, and the way back.

    B' is the product of the batch-like axes (`free`, batch first), L the
    product of the attention axes, in order. The layer folds its input and
    masks on the way in and unfolds its output on the way out; everything
    between works on `(B', L)`.
    """

    def __init__(self, x, axes):
        self.free, self.attention = axes
        rank = len(x.shape)
        self.identity = self.free == (0,) and self.attention == (1,)
        self.free_sizes = [_size(x, a) for a in self.free]
        self.attention_sizes = [_size(x, a) for a in self.attention]
        self.perm = list(self.free) + list(self.attention)
        if self.identity:
            self.tensor = x
            return
        x = tf.transpose(x, self.perm + [rank - 1])
        self.tensor = tf.reshape(x, [self.batch, self.length, x.shape[-1]])

    @property
    def batch(self):
        return _prod(self.free_sizes)

    @property
    def length(self):
        return _prod(self.attention_sizes)

    def apply(self, mask):
        """A mask of the query's shape without features -> (B', L)."""
        if mask is None or self.identity:
            return mask
        mask = tf.transpose(mask, self.perm)
        return tf.reshape(mask, [self.batch, self.length])

    def unfold(self, out):
        """(B', L, *out_shape) -> the query's leading axes + out_shape."""
        if self.identity:
            return out
        trailing = out.shape[2:].as_list()
        out = tf.reshape(out, self.free_sizes + self.attention_sizes + trailing)
        leading = len(self.perm)
        inverse = [self.perm.index(a) for a in range(leading)]
        return tf.transpose(out, inverse + list(range(leading, leading + len(trailing))))


@keras.saving.register_keras_serializable(package="keras_reformer")
class LSHAttention(SelfAttentionCall, SeedStatesInWeights, keras.layers.Layer):
    """Shared-QK locality-sensitive-hashing self-attention (Reformer).

    Each head projects the input once to `qk` (queries; keys are the
    unit-normalised queries) and once to values. Positions are hashed into
    buckets by random rotations, `argmax([xR; -xR])`, sorted by (bucket,
    position) and cut into chunks of `bucket_size`; each chunk attends to
    itself, `num_chunks_before` earlier and `num_chunks_after` later chunks.
    This is repeated for `num_hashes` independent rotations and the rounds
    are combined with their logsumexp weights. Cost per layer is
    O(length * num_hashes * bucket_size) instead of O(length ** 2).

    Causality: with `use_causal_mask=True`, or with an `attention_mask` that
    admits no later key (a lower-triangular mask, possibly merged with
    padding), a query attends to the most recent `num_chunks_before *
    bucket_size` keys of its own bucket (in every round) and never to later
    positions: unlike chunk windows, whose boundaries move with the buckets of
    later tokens, this keeps every output strictly independent of the tokens
    after it.

    Masks mean what they mean in `MultiHeadAttention`: the Keras mask of the
    query (e.g. from `Embedding(mask_zero=True)`), `query_mask`,
    `value_mask`, `key_mask` and `attention_mask` only remove keys. A
    position that no query may attend to is padding: it gets a bucket of its
    own and takes no chunk slot, so padding a batch to a longer length never
    changes the outputs at its real positions (its own output is not
    meaningful; the output carries the query's Keras mask, as
    `MultiHeadAttention`'s does, so pooling or an RNN after it skips it).

    The number of buckets never depends on padding: with `num_buckets=None`
    it is derived (about `2 * length / bucket_size`, factorized above
    `factorize_above`) from `max_length` if given, else from the static
    sequence length the layer is built with, else from 2048.

    Inference is deterministic: the hash rotations are fixed by the
    non-trainable weight `hash_seed` (from `seed`), which `save_weights` /
    `load_weights` carry. In training the rotations are drawn afresh at
    every call.

    Exact dense path: when a non-causal query's chunk window covers the
    whole (padded) input and no explicit mask or sliding window is given,
    LSH attention equals full attention and is computed densely; the two
    paths agree to float tolerance (tested), so the switch changes cost,
    not meaning. The causal rule has no dense shortcut.

    Args:
        num_heads: int, number of attention heads.
        key_dim: int, width of each head's shared query/key.
        value_dim: int, width of each head's value; defaults to `key_dim`.
        dropout: float, dropout rate on the attention probabilities.
        use_bias: bool, whether the projections have biases.
        output_shape: int or tuple, the trailing output shape; defaults to
            the query's last dimension.
        attention_axes: int or tuple, the axes attention runs over (for
            inputs of rank > 3); the other axes are batch-like. Several axes
            are flattened into one sequence.
        sliding_window: int or None, an extra limit: keys with
            `|query - key| >= sliding_window` are masked.
        use_gate: bool, a sigmoid gate on the attention output per head, as
            in `MultiHeadAttention(use_gate=True)`.
        bucket_size: int, chunk length (the paper's `c`), default 64.
        num_hashes: int, hash rounds; may be changed after training
            (attribute or call argument), e.g. raised for evaluation.
        num_buckets: None, an even int, or a pair of even ints `(b1, b2)` for
            factorized hashing with `b1 * b2` buckets (see above for None).
        max_length: int or None, the longest sequence the layer will see;
            sizes the derived bucket count.
        num_chunks_before: int, earlier chunks each chunk attends to.
        num_chunks_after: int, later chunks each chunk attends to.
        factorize_above: int, bucket count above which derived counts are
            factorized (default 256).
        seed: int or None, seeds the inference rotations (`hash_seed`) and
            the training stream. If None, one is drawn and kept in the config.
        value_shift: bool (causal only). If True, the key at position j
            brings the value of the next real position after j, and a query
            sees only strictly earlier keys; a query with none in any round
            outputs zeros. The score stays symmetric (shared QK), so a
            query that matches an earlier occurrence of its own token reads
            what followed it: the copy lookup shared QK cannot express
            otherwise (docs/learning.md). Defaults to False (the paper's
            attention).
        reference_rules: bool. If True, attention follows the rules of the
            reference implementation the public pretrained Reformers were
            trained with (HF transformers' `LSHSelfAttention`, see
            `keras_reformer.lsh.reference_rules` and docs/lsh_attention.md):
            per-head rotations held in the non-trainable weight `rotations`
            (the same in training and inference), all rounds sorted into one
            sequence with wrapping chunk windows, causality by position
            inside those windows (outputs are then not prefix-stable, so
            cached decoding cannot be exact), the reference's key scaling,
            and dense attention for inputs of at most one chunk. Only
            padding masks (no `attention_mask`, `sliding_window` or
            `value_shift`). Defaults to False.
        pad_multiple: int or None (with `reference_rules` only): the input is
            padded to a multiple of this (default `bucket_size`), as the
            reference model pads its input to the least common multiple of
            its chunk lengths.
        kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint,
        bias_constraint: as in `MultiHeadAttention`.

    Call arguments:
        query: tensor of shape `(B, T, dim)` (or higher rank with
            `attention_axes`).
        value, key: omitted or the query itself; cross-attention is refused.
        query_mask, value_mask, key_mask: optional `(B, T)` boolean masks
            (filled by Keras from the inputs' masks).
        attention_mask: optional boolean mask broadcastable to
            `(B, num_heads, T, T)`, as in `MultiHeadAttention`: `(T, T)`,
            `(B, T, T)`, `(1, T, T)` or `(B, num_heads, T, T)`.
        use_causal_mask: bool, no query attends to later positions.
        training: bool, dropout and fresh rotations when True.
        num_hashes: int, hash rounds for this call only.

    Returns:
        Tensor of shape `query.shape[:-1] + output_shape`, carrying the
        query's Keras mask.

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
        attention_axes=None,
        sliding_window=None,
        use_gate=False,
        bucket_size=64,
        num_hashes=2,
        num_buckets=None,
        max_length=None,
        num_chunks_before=1,
        num_chunks_after=0,
        factorize_above=hashing.DEFAULT_FACTORIZE_ABOVE,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        value_shift=False,
        reference_rules=False,
        pad_multiple=None,
        **kwargs,
    ):
        heads = self._checked_heads(num_heads, key_dim, value_dim)
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.supports_masking = True
        self.num_heads, self.key_dim, self.value_dim = heads
        self.dropout = _checks.rate("dropout", dropout)
        self.use_bias = bool(use_bias)
        self.use_gate = bool(use_gate)
        self._output_shape = _checks.output_shape(output_shape)
        self.attention_axes = _checks.int_tuple(
            "attention_axes", attention_axes, allow_none=True
        )
        self.sliding_window = _checks.positive_int(
            "sliding_window", sliding_window, allow_none=True
        )
        self.bucket_size = _checks.positive_int("bucket_size", bucket_size)
        self.num_hashes = num_hashes  # validated by the property setter
        self.num_buckets = _checks.even_int_or_pair("num_buckets", num_buckets, allow_none=True)
        self.max_length = _checks.positive_int("max_length", max_length, allow_none=True)
        self.num_chunks_before = _checks.non_negative_int(
            "num_chunks_before", num_chunks_before
        )
        self.num_chunks_after = _checks.non_negative_int(
            "num_chunks_after", num_chunks_after
        )
        self.factorize_above = _checks.positive_int("factorize_above", factorize_above)
        set_dense_arguments(self, kernel_initializer, bias_initializer,
                            kernel_regularizer, bias_regularizer, kernel_constraint,
                            bias_constraint)
        self.seed = resolve_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.resolved_num_buckets = None
        self.value_shift = _checks.boolean("value_shift", value_shift)
        self.reference_rules = _checks.boolean("reference_rules", reference_rules)
        self.pad_multiple = _checks.positive_int("pad_multiple", pad_multiple, allow_none=True)
        if self.reference_rules:
            unsupported = {"value_shift": self.value_shift,
                           "sliding_window": self.sliding_window}
            for name, value in unsupported.items():
                if value:
                    raise ValueError(
                        f"`reference_rules=True` supports no `{name}` (the "
                        f"reference's LSH attention has none). Received: "
                        f"{name}={value!r}"
                    )
        elif self.pad_multiple is not None:
            raise ValueError(
                "`pad_multiple` applies with `reference_rules=True` only. "
                f"Received: pad_multiple={pad_multiple!r}, reference_rules=False"
            )

    @property
    def num_hashes(self):
        return self._num_hashes

    @num_hashes.setter
    def num_hashes(self, value):
        self._num_hashes = _checks.positive_int("num_hashes", value)

    # ----------------------------------------------------------------- build

    def _axes(self, rank):
        """(batch-like axes, attention axes) for an input of `rank`."""
        if self.attention_axes is None:
            attention = tuple(range(1, rank - 1))
        else:
            attention = []
            for axis in self.attention_axes:
                if not -rank < axis < rank - 1 or axis % rank in (0, rank - 1):
                    raise ValueError(
                        "`attention_axes` must name axes between the batch "
                        f"and the feature axis of a rank-{rank} input. "
                        f"Received: attention_axes={self.attention_axes}"
                    )
                attention.append(axis % rank)
            attention = tuple(sorted(set(attention)))
        free = tuple(a for a in range(rank - 1) if a not in attention)
        return free, attention

    def _derive_num_buckets(self, length):
        if self.num_buckets is not None:
            return self.num_buckets
        length = self.max_length or length or DEFAULT_MAX_LENGTH
        c = self.bucket_size
        n = hashing.derived_num_buckets(-(-length // c) * c, c)
        return n if n <= self.factorize_above else hashing.factor_num_buckets(n)

    def build(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        if len(query_shape) < 3:
            raise ValueError(
                "LSHAttention expects `query` of rank >= 3 (batch, length, "
                f"features). Received: query_shape={query_shape}"
            )
        if query_shape[-1] is None:
            raise ValueError(
                "The last dimension of `query` must be known. "
                f"Received: query_shape={query_shape}"
            )
        for name, shape in (("value", value_shape), ("key", key_shape)):
            if shape is not None and tuple(shape) != query_shape:
                raise ValueError(
                    f"`{name}` must be the query itself (self-attention); its "
                    f"shape differs. Received: {name}_shape={tuple(shape)}, "
                    f"query_shape={query_shape}"
                )
        rank = len(query_shape)
        _, attention = self._axes(rank)
        length = 1
        for axis in attention:
            length = None if length is None or query_shape[axis] is None else (
                length * query_shape[axis]
            )
        self.resolved_num_buckets = self._derive_num_buckets(length)
        features = query_shape[-1]
        self._input_dim = features
        self._query_rank = rank
        flat_shape = (None, length, features)
        bias = "de" if self.use_bias else None

        def heads_dense(name, width, **extra):
            dense = keras.layers.EinsumDense(
                "abc,cde->abde", output_shape=(None, self.num_heads, width),
                bias_axes=bias, name=name, **extra, **sublayer_arguments(self),
            )
            dense.build(flat_shape)
            return dense

        self.qk_dense = heads_dense("qk", self.key_dim)
        self.value_dense = heads_dense("value", self.value_dim)
        if self.use_gate:
            self.gate_dense = heads_dense("gate", self.value_dim, activation="sigmoid")
        out_shape = self._output_shape or (features,)
        letters = string.ascii_lowercase[4:4 + len(out_shape)]
        self.output_dense = keras.layers.EinsumDense(
            f"abcd,cd{letters}->ab{letters}",
            output_shape=(None,) + out_shape,
            bias_axes=letters if self.use_bias else None,
            name="attention_output",
            **sublayer_arguments(self),
        )
        self.output_dense.build((None, length, self.num_heads, self.value_dim))
        # The inference rotations' seed is a weight, so save_weights /
        # load_weights reproduce predictions (a config-only seed did not).
        # int64, not int32: TensorFlow keeps int32 variables in host memory,
        # and an XLA-compiled step on a GPU cannot read them ("Trying to
        # access resource ... located in device CPU:0 from device GPU:0").
        self.hash_seed = self.add_weight(
            name="hash_seed", shape=(2,), dtype="int64", trainable=False,
            initializer=keras.initializers.Constant([self.seed, 0]),
        )
        if self.reference_rules:
            # Per-head rotations, fixed (an imported model's are set by the
            # converter, or drawn here from the seed).
            seed = self.seed

            def draw(shape, dtype=None):
                return rotations.deterministic_normal(shape, [seed, 1])

            self.rotations = self.add_weight(
                name="rotations", trainable=False, initializer=draw,
                shape=(self.num_heads, self.key_dim, self.num_hashes,
                       sum(self._factors()) // 2),
            )
        self.built = True

    # ------------------------------------------------- call (public helpers)

    def _rotations(self, factors, num_hashes, training):
        """One (key_dim, num_hashes, n / 2) rotation per bucket factor."""
        if training:
            # Fresh every step; replayable by StatelessScope (state mapping).
            seed = tf.cast(self.seed_generator.next(), tf.int32)
        else:
            seed = tf.cast(self.hash_seed.value, tf.int32)
        return rotations.draw_rotations(self.key_dim, factors, num_hashes, seed)

    def _factors(self):
        n = self.resolved_num_buckets
        return n if isinstance(n, tuple) else (n,)

    def hash_buckets(self, qk, num_hashes=None, training=False, rotations=None):
        """Bucket ids of shared-QK vectors.

        Args:
            qk: (B, H, L, key_dim) float32, from `project`.
            num_hashes: int, rounds (default: the layer's).
            training: bool, fresh rotations (True) or those of `hash_seed`.
            rotations: the rotations to hash with, drawn already (then
                `num_hashes` and `training` are not used).

        Returns:
            (buckets (B, H, num_hashes, L) int32, total bucket count int).
        """
        factors = self._factors()
        if rotations is None:
            num_hashes = self.num_hashes if num_hashes is None else _checks.positive_int(
                "num_hashes", num_hashes
            )
            rotations = self._rotations(factors, num_hashes, training)
        return hashing.hash_vectors(qk, rotations), math.prod(factors)

    def project(self, x):
        """(B, L, features) -> (qk (B, H, L, D), values (B, H, L, E)), float32."""
        qk = tf.cast(self.qk_dense(x), tf.float32)
        v = tf.cast(self.value_dense(x), tf.float32)
        return tf.transpose(qk, [0, 2, 1, 3]), tf.transpose(v, [0, 2, 1, 3])

    def attend_output(self, out, gate=None):
        """Attention output (B, H, L, E) float32 -> (B, L, *output_shape)."""
        out = tf.cast(tf.transpose(out, [0, 2, 1, 3]), self.compute_dtype)
        if gate is not None:
            out = out * gate
        return self.output_dense(out)

    # ------------------------------------------------------ cached decoding

    @property
    def reach(self):
        """Earlier keys of its bucket a causal query sees per round."""
        return self.num_chunks_before * self.bucket_size

    def inference_rotations(self, num_hashes=None):
        """The hash rotations of inference (from `hash_seed`), one tensor per
        bucket factor: the same at every decoding step, so draw them once."""
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        return self._rotations(self._factors(), num_hashes, False)

    def init_cache(self, query, padding_mask, max_length):
        """The decoding cache after a causal pass over `query`.

        Args:
            query: (B, P, features), the layer's input over the prompts.
            padding_mask: (B, P) bool, True on the positions to cache.
            max_length: int, the longest sequence the cache will hold.

        Returns:
            The cache (`lsh.decoding.init_cache`) for `call_with_cache`.
        """
        qk, v = self.project(query)
        buckets, total = self.hash_buckets(qk)
        if self.value_shift:
            v = value_shift.shifted_values(v, padding_mask)
        return decoding.init_cache(
            qk, v, buckets, padding_mask, total, self.reach, max_length
        )

    def call_with_cache(self, query, cache, position, rotations=None, in_place=False):
        """Causal attention of one new position per row, from the cache.

        Equals the layer's causal output at `position` over the tokens
        before it (inference rotations, no dropout).

        Args:
            query: (B, 1, features), the layer's input at the new position.
            cache: from `init_cache` or a previous call.
            position: (B,) int32, the new position of each row.
            rotations: `inference_rotations()` (drawn here if None).
            in_place: overwrite the cache's buffers (TensorFlow graph mode
                only; see `lsh.decoding.decode_step`).

        Returns:
            (output (B, 1, *output_shape), updated cache).
        """
        if rotations is None:
            rotations = self.inference_rotations()
        qk, v = self.project(query)
        buckets = hashing.hash_vectors(qk, rotations)
        out, cache = decoding.decode_step(
            cache, qk[:, :, 0], v[:, :, 0], buckets[..., 0], position,
            self.reach, self.sliding_window, in_place=in_place,
            value_shift=self.value_shift,
        )
        gate = self.gate_dense(query) if self.use_gate else None
        return self.attend_output(out[:, :, None], gate), cache

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
        num_hashes=None,
    ):
        # `__call__` forwards only the query and refuses attention scores.
        del value, key, return_attention_scores
        p = self._prepare(query, query_mask, value_mask, key_mask, attention_mask,
                          use_causal_mask, num_hashes)
        if self._heads_in_turn(p.x):
            out = self._attend_heads_in_turn(p, training)
        else:
            x, valid = p.x, p.valid
            gate = self.gate_dense(x) if self.use_gate else None
            qk, v = self.project(x)
            if self.value_shift:
                v = value_shift.shifted_values(v, valid)
            if not self.reference_rules:
                out = self._own_attend(qk, v, valid, p.length, p.causal,
                                       p.query_key_mask, p.causal_rows, p.num_hashes,
                                       training)
            else:
                out = self._reference_attend(qk, v, valid, p.length, p.causal, training)
            out = self.attend_output(out, gate)
        out = p.folded.unfold(out)
        if p.query_mask is not None:
            set_keras_mask(out, p.query_mask)
        return out

    def value_and_vjp(self, query, dy, query_mask=None, value_mask=None, key_mask=None,
                      attention_mask=None, training=None, use_causal_mask=False,
                      num_hashes=None):
        """The output and its VJP with `dy`, for a reversible backward pass.

        For inputs long enough that the layer runs its heads one at a time
        (see `head_loop`), each head's forward runs once here, under its own
        tape, and gives its share of the output and of the gradients; run
        under a tape, `call` would run every head twice (for the output, and
        again in its recomputing gradient). For other inputs this is `call`.

        Same contract as `ChunkedFeedForward.value_and_vjp`: run it under the
        caller's `tf.GradientTape` (and, to replay the random draws, the
        `keras.StatelessScope` holding the forward's seed states), then
        finish with `tape.gradient(targets, sources,
        output_gradients=target_grads)`.

        Args:
            query, query_mask, value_mask, key_mask, attention_mask,
            training, use_causal_mask, num_hashes: as in `call`.
            dy: gradient of the output, of its shape.

        Returns:
            `(outputs, targets, target_grads)`: the output as `call` returns
            it, and two lists of tensors and their gradients.
        """
        kwargs = dict(query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
                      attention_mask=attention_mask, use_causal_mask=use_causal_mask,
                      num_hashes=num_hashes)
        # What Keras' __call__ would do to the inputs (autocast).
        p = self._prepare(tf.cast(query, self.compute_dtype), **kwargs)
        if not self._heads_in_turn(p.x):
            outputs = self(query, training=training, **kwargs)
            return outputs, [outputs], [tf.cast(dy, outputs.dtype)]
        # Under the layer's name, as `call`'s ops are (profiles and graphs
        # then show this loop as the layer's).
        with tf.name_scope(self.name):
            head, per_head, bias = self._head_program(p, training)
            d_out = Folded(tf.cast(dy, self.compute_dtype), self._axes(len(dy.shape))).tensor
            total, dx, d_per_head = head_loop.sum_and_vjp_over_heads(
                head, p.x, per_head, self.num_heads, per_head[1].shape[-1], d_out)
            out = tf.cast(total, self.compute_dtype)
            targets, grads = [p.x] + per_head, [dx] + d_per_head
            if bias is not None:
                # The bias is added after the loop; its gradient is dy's sum.
                out = out + bias
                targets.append(bias)
                grads.append(tf.reduce_sum(d_out, axis=[0, 1]))
        return p.folded.unfold(out), targets, grads

    def _prepare(self, query, query_mask, value_mask, key_mask, attention_mask,
                 use_causal_mask, num_hashes):
        """`call`'s checks, and its input and masks folded to (B, L) by
        `attention_axes` (a `_Prepared`)."""
        num_hashes = self.num_hashes if num_hashes is None else _checks.positive_int(
            "num_hashes", num_hashes
        )
        if query_mask is None:
            query_mask = get_keras_mask(query)
        x = query
        rank = len(x.shape)
        if rank != self._query_rank or x.shape[-1] != self._input_dim:
            raise ValueError(
                f"LSHAttention expects `query` of rank {self._query_rank} with "
                f"{self._input_dim} features, the shape it was built for. "
                f"Received: query.shape={tuple(x.shape)}"
            )
        causal = bool(use_causal_mask)
        if self.reference_rules and (
                attention_mask is not None or num_hashes != self.rotations.shape[2]):
            raise ValueError(
                "LSHAttention(reference_rules=True) takes padding masks only "
                f"and hashes with its {self.rotations.shape[2]} rounds of "
                "`rotations`. Received: attention_mask="
                f"{'given' if attention_mask is not None else None}, "
                f"num_hashes={num_hashes}"
            )
        if self.value_shift and (not causal or attention_mask is not None):
            raise ValueError(
                "LSHAttention(value_shift=True) needs `use_causal_mask=True` "
                "and no `attention_mask` (a key brings the value of the next "
                "position, which only a strictly earlier query may read). "
                f"Received: use_causal_mask={causal}, attention_mask="
                f"{'given' if attention_mask is not None else None}"
            )
        # The mask is consumed here; the projections must not see it.
        set_keras_mask(x, None)

        # The layer's own work first: the input and its key masks folded to
        # (B, L) by `attention_axes`, then projected.
        folded = Folded(x, self._axes(rank))
        x = folded.tensor
        key_masks = [folded.apply(m) for m in (query_mask, value_mask, key_mask)]

        # Masks: the query-key mask mapped along; a key nobody may attend to
        # is padding.
        query_key_mask = None
        if attention_mask is not None:
            query_key_mask = masks.broadcast_query_key_mask(
                attention_mask, folded, self.num_heads
            )
        batch = tf.shape(x)[0]
        length = x.shape[1] if x.shape[1] is not None else tf.shape(x)[1]
        valid, causal_rows = masks.valid_keys(
            key_masks, query_key_mask, batch, length, causal
        )
        return _Prepared(folded, x, valid, length, causal, query_key_mask,
                         causal_rows, num_hashes, query_mask)

    def _heads_in_turn(self, x):
        """Whether `call` runs its heads one at a time (`head_loop`): for
        inputs whose per-head tensors of all heads would be large, and where
        the projections are plain kernels (no gate, no quantized kernels)."""
        length = x.shape[1]
        if self.reference_rules or self.use_gate or length is None:
            return False
        if any(getattr(dense, "quantization_mode", None) is not None
               for dense in (self.qk_dense, self.value_dense, self.output_dense)):
            return False
        if len(self.output_dense.kernel.shape) != 3:  # a multi-axis output_shape
            return False
        width = max(self.key_dim, self.value_dim)
        return length * self.num_heads * width > head_loop.HEAD_LOOP_ELEMENTS

    def _attend_heads_in_turn(self, p, training):
        """`call`'s projections, attention and output projection one head at
        a time, the heads' outputs summed (see `head_loop`)."""
        head, per_head, bias = self._head_program(p, training)
        out = head_loop.sum_over_heads(head, p.x, per_head, self.num_heads,
                                       output_dim=per_head[1].shape[-1])
        out = tf.cast(out, self.compute_dtype)
        return out if bias is None else out + bias

    def _head_program(self, p, training):
        """`(head_fn, per_head, bias)` of `head_loop`'s sums for the prepared
        input `p`: one head's projections, attention and output projection,
        the weights with the head first, and the output bias (or None).

        The random numbers (rotations, dropout seeds) are drawn here, before
        any loop: each head's recomputation in the backward pass sees the
        same."""
        dtype = self.compute_dtype
        valid, length, causal = p.valid, p.length, p.causal

        def kernel(dense, order):
            return tf.transpose(tf.cast(dense.kernel, dtype), order)

        # Head first: the two input projections side by side (H, F, D + E),
        # so that a head's input gradient is one matmul. Two, summed with
        # the loop's running total, make a three-input AddN inside nested
        # loops, which graph mode's memory optimizer (Grappler) rewrites
        # into a temporary variable when it estimates the step near the
        # machine's memory; that variable's name then collides between
        # loop iterations (AlreadyExistsError at 128K tokens). Then
        # (H, E, F_out) and the input biases (H, D + E).
        per_head = [tf.concat([kernel(self.qk_dense, [1, 0, 2]),
                               kernel(self.value_dense, [1, 0, 2])], -1),
                    tf.cast(self.output_dense.kernel, dtype)]
        biases = [d.bias for d in (self.qk_dense, self.value_dense)]
        if all(b is not None for b in biases):
            per_head.append(tf.concat([tf.cast(b, dtype) for b in biases], -1))
        key_dim = self.key_dim
        drawn = self._rotations(self._factors(), p.num_hashes, training)
        rate, seed = self._dropout(training)

        def head_of(mask, h):
            """Head `h`'s rows of a (batch, heads, ...) mask (one head: all)."""
            if mask is None or mask.shape[1] == 1:
                return mask
            return tf.gather(mask, tf.reshape(h, [1]), axis=1)

        def head(h, x, w_in, w_out, *b):
            qkv = tf.einsum("blf,fk->blk", x, w_in)
            if b:
                qkv = qkv + b[0]
            qkv = tf.cast(qkv, tf.float32)[:, None]
            qk, v = qkv[..., :key_dim], qkv[..., key_dim:]
            if self.value_shift:
                v = value_shift.shifted_values(v, valid)
            head_seed = None
            if seed is not None:
                head_seed = tf.random.experimental.stateless_fold_in(seed, h)
            out = self._own_attend(
                qk, v, valid, length, causal, head_of(p.query_key_mask, h),
                head_of(p.causal_rows, h), p.num_hashes, training,
                drawn=drawn, dropout=(rate, head_seed))
            return tf.einsum("ble,ef->blf", tf.cast(out[:, 0], dtype), w_out)

        bias = self.output_dense.bias
        return head, per_head, None if bias is None else tf.cast(bias, dtype)

    def _own_attend(self, qk, v, valid, length, causal, query_key_mask, causal_rows,
                    num_hashes, training, drawn=None, dropout=None):
        """The library's rules: (B, H, L, .) projections -> (B, H, L, E).
        `drawn` (the hash rotations) and `dropout` (rate, seed) are drawn
        here unless given."""
        # Padded to whole chunks.
        c = self.bucket_size
        padded_length = -(-length // c) * c
        pad = padded_length - length
        # Statically unpadded (the usual case): no pad, and no slice below,
        # whose gradient is a zero-filled (B, H, L, E) copy.
        padded = not (isinstance(pad, int) and pad == 0)
        if padded:
            qk = tf.pad(qk, [[0, 0], [0, 0], [0, pad], [0, 0]])
            v = tf.pad(v, [[0, 0], [0, 0], [0, pad], [0, 0]])
            valid = tf.pad(valid, [[0, 0], [0, pad]], constant_values=False)
        if query_key_mask is not None:
            query_key_mask = tf.pad(query_key_mask, [[0, 0], [0, 0], [0, pad], [0, pad]])

        rate, dropout_seed = self._dropout(training) if dropout is None else dropout
        settings = chunk_attention.ChunkSettings(
            bucket_size=c,
            chunks_before=self.num_chunks_before,
            chunks_after=self.num_chunks_after,
            causal=causal,
            strict=self.value_shift,
            sliding_window=self.sliding_window,
            dropout_rate=rate,
        )

        def hashed():
            # Hashing, sorting, then (a group of rows at a time) the rows in
            # sorted order, chunk attention, unsorting, the rounds combined.
            buckets, total = self.hash_buckets(qk, num_hashes, training, rotations=drawn)
            sorted_order = sorting.sort_order(buckets, valid, total)
            return chunk_attention.attend(
                qk, v, sorted_order, valid, settings,
                query_key_mask=query_key_mask, causal_rows=causal_rows,
                dropout_seed=dropout_seed,
            )

        def dense():
            return dense_attention.dense_attend(
                qk, v, valid, dropout_rate=rate, dropout_seed=dropout_seed,
            )

        if causal or query_key_mask is not None or self.sliding_window is not None:
            out = hashed()
        else:
            covers = dense_attention.window_covers_all(
                padded_length // c, self.num_chunks_before, self.num_chunks_after,
            )
            if isinstance(covers, bool):
                out = dense() if covers else hashed()
            else:
                out = tf.cond(covers, dense, hashed)  # length known only at run time
        return out[:, :, :length] if padded else out

    def _reference_attend(self, qk, v, valid, length, causal, training):
        """`reference_rules.attend_hashed` on the input padded to `pad_multiple`
        (dense for a padded length of at most one chunk)."""
        c = self.bucket_size
        multiple = self.pad_multiple or c
        pad = -length % multiple
        qk, v = (tf.pad(t, [[0, 0], [0, 0], [0, pad], [0, 0]]) for t in (qk, v))
        valid = tf.pad(valid, [[0, 0], [0, pad]], constant_values=False)
        padded_length = length + pad
        rate, seed = self._dropout(training)

        def hashed():
            factors = self._factors()
            buckets = hashing.hash_per_head(qk, tf.convert_to_tensor(self.rotations), factors)
            return reference_rules.attend_hashed(
                qk, v, valid, buckets, math.prod(factors), c, self.num_chunks_before,
                self.num_chunks_after, causal, rate, seed,
            )

        def dense():
            return reference_rules.attend_dense(qk, v, valid, causal, rate, seed)

        if isinstance(padded_length, int):
            out = dense() if padded_length <= c else hashed()
        else:
            out = tf.cond(padded_length <= c, dense, hashed)
        return out[:, :, :length]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "output_shape": self._output_shape,
                "attention_axes": self.attention_axes,
                "sliding_window": self.sliding_window,
                "use_gate": self.use_gate,
                "bucket_size": self.bucket_size,
                "num_hashes": self.num_hashes,
                "num_buckets": self.num_buckets,
                "value_shift": self.value_shift,
                "max_length": self.max_length,
                "num_chunks_before": self.num_chunks_before,
                "num_chunks_after": self.num_chunks_after,
                "factorize_above": self.factorize_above,
                "reference_rules": self.reference_rules,
                "pad_multiple": self.pad_multiple,
                **dense_arguments_config(self),
                "seed": self.seed,
            }
        )
        return config
