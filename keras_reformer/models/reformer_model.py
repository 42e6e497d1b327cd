"""ReformerModel: token ids -> logits (or hidden states), a functional keras.Model."""


import keras
import numpy as np
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer._seeds import SEED_LIMIT, resolve_seed

from keras_reformer.layers._layer_norm import LayerNorm
from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding
from keras_reformer.layers.reformer_blocks import AttentionBlock, FeedForwardBlock
from keras_reformer.layers.reversible_sequence import ReversibleSequence
from keras_reformer.layers.short_convolution import ShortConvolution
from keras_reformer.layers.sinusoidal_position_embedding import (
    SinusoidalPositionEmbedding,
)
from keras_reformer.layers.token_id_check import TokenIdCheck
from keras_reformer.models._token_id_inputs import TokenIdInputs

POSITION_EMBEDDINGS = ("axial", "sinusoidal", None)


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer"
            f"{' or None' if allow_none else ''}. Received: {name}={value!r}"
        )
    return value


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def _rate(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    return float(value)


def sample_next_token(logits, temperature=1.0, top_k=None, seed=(0, 0)):
    """Draws one token per row of `logits` `(batch, vocabulary)`.

    `temperature=0` is argmax; otherwise a draw from
    `softmax(logits / temperature)`, restricted to the `top_k` largest
    logits if given (ties with the k-th are kept). `seed` is a stateless
    seed pair: the same pair, the same draw. Returns int32 numpy `(batch,)`.
    """
    logits = tf.cast(logits, tf.float32)
    if temperature == 0:
        return np.asarray(tf.argmax(logits, axis=-1, output_type=tf.int32))
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
        logits = tf.where(logits < kth, tf.constant(-np.inf, logits.dtype), logits)
    return np.asarray(
        tf.random.stateless_categorical(logits, 1, seed=seed, dtype=tf.int32)[:, 0]
    )


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerModel(TokenIdInputs, keras.Model):
    """The Reformer: LSH attention in a reversible stack with chunked FFNs.

    A functional model (built in `__init__`, as keras-hub builds backbones):

        token ids (+ padding mask) -> Embedding -> + position embedding
        [-> + ShortConvolution] -> [x, x] -> ReversibleSequence of num_layers x
           (LayerNorm -> LSHAttention, LayerNorm -> ChunkedFeedForward)
        -> concat(y1, y2) -> LayerNorm -> Dense(vocabulary_size)

    Inputs are a dict: `"token_ids"` (int32, `(batch, length)`, any length up
    to `max_sequence_length`) and `"padding_mask"` (`(batch, length)`, 1 for
    real tokens, 0 for padding). A token id outside `[0, vocabulary_size)`
    is an error naming it, also under XLA: `fit`, `evaluate`, `predict` and
    `*_on_batch` check their inputs before the compiled step (arrays at
    once, datasets batch by batch in tf.data). Output: logits `(batch, length,
    vocabulary_size)`, or with `include_head=False` the final hidden states
    `(batch, length, 2 * hidden_dim)` for a head of your own, e.g.

        encoder = ReformerModel(vocab, causal=False, include_head=False)
        pooled = keras.layers.GlobalAveragePooling1D()(encoder.output)
        classifier = keras.Model(encoder.input, keras.layers.Dense(2)(pooled))

    Args:
        vocabulary_size: number of token ids.
        num_layers: reversible layers (each an attention and an FFN block).
        hidden_dim: model width (each of the two streams).
        num_heads: attention heads.
        key_dim: width per head (default `hidden_dim // num_heads`).
        intermediate_dim: FFN width (default `4 * hidden_dim`).
        feedforward_chunk_size: positions per FFN slice (default 1024, see
            `ChunkedFeedForward`).
        bucket_size, num_hashes, num_buckets: LSH attention (see LSHAttention).
        num_chunks_before: earlier chunks a chunk attends to (default 1, the
            paper's look-one-back); a causal query sees the
            `num_chunks_before * bucket_size` most recent keys of its bucket
            per round. A reach of 2 costs 1.5x the attention's work; at 2K
            with 16 buckets it did not learn better than 1
            (docs/learning.md, "Three seeds, and a longer reach").
        dropout: residual and embedding dropout.
        attention_dropout: dropout on attention probabilities.
        max_sequence_length: longest input (sizes the position embedding).
        axial_shape: `(l1, l2)` of the axial embedding (default derived).
        position_embedding: "axial" (default), "sinusoidal" or None.
        short_convolution: int or None. If set, a `ShortConvolution` of this
            width (causal if `causal`) over the embedded tokens is added to
            them, so each position sees its nearest neighbours whatever the
            hashing does; byte models learn far faster with it
            (docs/learning.md). Defaults to `None` (the paper's model).
        value_shift: bool. If True (causal only), attention keys bring the
            value of the next position and queries see strictly earlier
            keys (`LSHAttention(value_shift=True)`): shared QK can then
            copy what followed an earlier occurrence (docs/learning.md).
            Defaults to False (the paper's model).
        causal: True for a language model, False for an encoder.
        reversible: False computes the same function with ordinary autodiff.
        stack_weights: bool. If True, the reversible stack holds each kind
            of block weight as one `(num_layers, ...)` variable
            (`ReversibleSequence(stack_weights=True)`): under XLA the
            compiled step then stops growing with depth (see
            docs/benchmarks.md, "Stacked weights"). The weight layout
            differs, so weights saved with one setting do not load into
            the other. Defaults to False.
        include_head: add the LayerNorm'd vocabulary projection (logits).
        seed: seeds the random parts of the computation: the hash
            rotations and the dropout masks (None: drawn, stored in the
            config). The initial weights follow Keras' global seed, as for
            any Keras layer: `keras.utils.set_random_seed(n)` before building
            makes them reproducible.
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers=2,
        hidden_dim=256,
        num_heads=4,
        key_dim=None,
        intermediate_dim=None,
        feedforward_chunk_size=1024,
        bucket_size=64,
        num_hashes=2,
        num_buckets=None,
        num_chunks_before=1,
        dropout=0.0,
        attention_dropout=0.0,
        max_sequence_length=8192,
        axial_shape=None,
        position_embedding="axial",
        short_convolution=None,
        value_shift=False,
        causal=True,
        reversible=True,
        include_head=True,
        seed=None,
        stack_weights=False,
        dtype=None,
        **kwargs,
    ):
        _positive("vocabulary_size", vocabulary_size)
        _positive("num_layers", num_layers)
        _positive("hidden_dim", hidden_dim)
        _positive("num_heads", num_heads)
        key_dim = _positive("key_dim", key_dim, True) or max(1, hidden_dim // num_heads)
        intermediate_dim = (
            _positive("intermediate_dim", intermediate_dim, True) or 4 * hidden_dim
        )
        _positive("feedforward_chunk_size", feedforward_chunk_size)
        _positive("max_sequence_length", max_sequence_length)
        _checks.non_negative_int("num_chunks_before", num_chunks_before)
        _positive("short_convolution", short_convolution, True)
        _rate("dropout", dropout)
        _rate("attention_dropout", attention_dropout)
        causal = _flag("causal", causal)
        reversible = _flag("reversible", reversible)
        include_head = _flag("include_head", include_head)
        stack_weights = _flag("stack_weights", stack_weights)
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"`position_embedding` must be one of {POSITION_EMBEDDINGS}. "
                f"Received: position_embedding={position_embedding!r}"
            )
        seed = resolve_seed(seed)

        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
        ids = TokenIdCheck(vocabulary_size, dtype=dtype, name="token_id_check")(
            token_ids
        )
        x = keras.layers.Embedding(
            vocabulary_size, hidden_dim, dtype=dtype, name="token_embedding",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
        )(ids)
        if position_embedding == "axial":
            x = x + AxialPositionEmbedding(
                max_sequence_length, axial_shape=axial_shape, dtype=dtype,
                name="position_embedding",
            )(x)
        elif position_embedding == "sinusoidal":
            x = x + SinusoidalPositionEmbedding(
                max_sequence_length, dtype=dtype, name="position_embedding"
            )(x)
        mask = keras.ops.cast(padding_mask, "bool")
        if short_convolution is not None:
            x = x + ShortConvolution(
                short_convolution, causal=causal, dtype=dtype, name="short_convolution"
            )(x, mask=mask)
        x = keras.layers.Dropout(dropout, seed=seed, dtype=dtype,
                                 name="embedding_dropout")(x)
        # The bucket count comes from max_sequence_length, never from a
        # batch's (padded) length: padding must not change real outputs,
        # and cached decoding needs a count that does not grow with the text.
        value_shift = _flag("value_shift", value_shift)
        if value_shift and not causal:
            raise ValueError(
                "`value_shift=True` needs `causal=True` (a key brings the value of "
                f"the next position). Received: value_shift=True, causal={causal}"
            )
        attention_kwargs = dict(bucket_size=bucket_size, num_hashes=num_hashes,
                                num_buckets=num_buckets,
                                max_length=max_sequence_length)
        if value_shift:
            attention_kwargs["value_shift"] = True
        if num_chunks_before != 1:
            attention_kwargs["num_chunks_before"] = num_chunks_before
        blocks = [
            (
                AttentionBlock(
                    num_heads, key_dim, causal=causal, dropout=dropout,
                    attention_dropout=attention_dropout, seed=(seed + 10 * i + 1) % SEED_LIMIT,
                    attention_kwargs=attention_kwargs, dtype=dtype,
                    name=f"attention_block_{i}",
                ),
                FeedForwardBlock(
                    intermediate_dim, chunk_size=feedforward_chunk_size,
                    dropout=dropout, seed=(seed + 10 * i + 5) % SEED_LIMIT, dtype=dtype,
                    name=f"feed_forward_block_{i}",
                ),
            )
            for i in range(num_layers)
        ]
        y1, y2 = ReversibleSequence(
            blocks, reversible=reversible, stack_weights=stack_weights, dtype=dtype,
            name="reversible_stack",
        )([x, x], mask=[mask, mask])
        h = keras.layers.Concatenate(dtype=dtype, name="concat_streams")([y1, y2])
        h = LayerNorm(epsilon=1e-6, dtype=dtype, name="final_norm")(h)
        outputs = h
        if include_head:
            outputs = keras.layers.Dense(
                vocabulary_size, dtype=dtype, name="logits"
            )(h)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.intermediate_dim = intermediate_dim
        self.feedforward_chunk_size = feedforward_chunk_size
        self.bucket_size = bucket_size
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.num_chunks_before = num_chunks_before
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.max_sequence_length = max_sequence_length
        self.axial_shape = axial_shape
        self.position_embedding = position_embedding
        self.short_convolution = short_convolution
        self.value_shift = value_shift
        self.causal = causal
        self.reversible = reversible
        self.include_head = include_head
        self.seed = seed
        self.stack_weights = stack_weights

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "intermediate_dim": self.intermediate_dim,
            "feedforward_chunk_size": self.feedforward_chunk_size,
            "bucket_size": self.bucket_size,
            "num_hashes": self.num_hashes,
            "num_buckets": self.num_buckets,
            "num_chunks_before": self.num_chunks_before,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "max_sequence_length": self.max_sequence_length,
            "axial_shape": self.axial_shape,
            "position_embedding": self.position_embedding,
            "short_convolution": self.short_convolution,
            "value_shift": self.value_shift,
            "causal": self.causal,
            "reversible": self.reversible,
            "include_head": self.include_head,
            "seed": self.seed,
            "stack_weights": self.stack_weights,
            # The policy the layers were built with (the argument, or the
            # global policy at construction), so a reload computes alike.
            "dtype": keras.dtype_policies.serialize(
                self.get_layer("token_embedding").dtype_policy
            ),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def set_num_hashes(self, num_hashes):
        """Change the hash rounds of every attention layer (no retraining).

        E.g. more rounds for evaluation than for training. The new value is
        in `get_config()` (and so in a `.keras` file saved afterwards); the
        compiled predict/evaluate/train functions are retraced.
        """
        _positive("num_hashes", num_hashes)
        for layer in self._flatten_layers():
            if isinstance(layer, AttentionBlock):
                layer.attention.num_hashes = num_hashes
                layer.attention_kwargs["num_hashes"] = num_hashes
        self.num_hashes = num_hashes
        # Traced functions baked the old value in.
        self._generate_fn = None
        self.predict_function = self.test_function = self.train_function = None

    # -------------------------------------------------------------- generate

    def _logits_fn(self):
        if getattr(self, "_generate_fn", None) is None:
            spec = tf.TensorSpec([None, None], tf.int32)

            @tf.function(input_signature=[spec, spec])
            def logits(ids, mask):
                out = self({"token_ids": ids, "padding_mask": mask}, training=False)
                lengths = tf.reduce_sum(mask, axis=1)
                last = tf.gather(out, lengths - 1, axis=1, batch_dims=1)
                return tf.cast(last, tf.float32)

            self._generate_fn = logits
        return self._generate_fn

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None,
                 seed=None, end_token_id=None):
        """Sample continuations of `prompt_ids` (causal models only).

        Each step runs the model on the whole prefix (there is no cache):
        generating `n` tokens after a prompt of `p` costs `n` forward passes,
        over `p, p + 1, ..., p + n - 1` tokens, i.e. O(n * (p + n))
        token-positions of work (each pass is linear in its length, LSH
        attention being O(length * num_hashes * bucket_size)). The pass is
        one `tf.function` with a dynamic length: traced once, not per step.
        All prompts of a batch have the same length (no left padding).
        For long prompts use `keras_reformer.models.ReformerCausalLM`, whose
        `generate()` runs one compiled loop with a per-layer LSH cache.

        Args:
            prompt_ids: `(batch, length)` ints, or one list of ints.
            max_new_tokens: tokens to add.
            temperature: 0 for greedy (argmax) decoding, else the softmax
                temperature.
            top_k: sample among the `top_k` most likely tokens only.
            seed: int; the same seed gives the same samples.
            end_token_id: stop a sequence once it produced this token (the
                rest of its row is filled with it); stop when all have.

        Returns:
            int32 numpy array `(batch, length + generated)`.
        """
        if not self.causal or not self.include_head:
            raise ValueError(
                "generate() needs a causal model with its head "
                f"(causal={self.causal}, include_head={self.include_head})."
            )
        ids = np.asarray(prompt_ids, dtype=np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(
                "`prompt_ids` must be (batch, length) with length >= 1. "
                f"Received shape: {ids.shape}"
            )
        _positive("max_new_tokens", max_new_tokens)
        if temperature < 0:
            raise ValueError(
                f"`temperature` must be >= 0. Received: temperature={temperature!r}"
            )
        _positive("top_k", top_k, allow_none=True)
        if ids.shape[1] + max_new_tokens > self.max_sequence_length:
            raise ValueError(
                f"Prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} "
                f"exceeds max_sequence_length={self.max_sequence_length}."
            )
        seed = resolve_seed(seed)
        logits_fn = self._logits_fn()
        done = np.zeros(len(ids), bool)
        for step in range(max_new_tokens):
            logits = logits_fn(ids, np.ones_like(ids))
            nxt = sample_next_token(logits, temperature, top_k, seed=[seed, step])
            if end_token_id is not None:
                nxt = np.where(done, end_token_id, nxt)
                done |= nxt == end_token_id
            ids = np.concatenate([ids, nxt[:, None].astype(np.int32)], axis=1)
            if end_token_id is not None and done.all():
                break
        return ids
