"""ReformerBackbone: token ids -> hidden states, a keras-hub `Backbone`."""

import math

import keras
import keras_hub

from keras_reformer import _checks
from keras_reformer._seeds import SEED_LIMIT, resolve_seed

from keras_reformer.layers._dropout import Dropout
from keras_reformer.layers._layer_norm import LayerNorm
from keras_reformer.layers.axial_position_embedding import AxialPositionEmbedding
from keras_reformer.layers.reformer_blocks import AttentionBlock, FeedForwardBlock
from keras_reformer.layers.reversible_sequence import ReversibleSequence
from keras_reformer.layers.short_convolution import ShortConvolution
from keras_reformer.layers.sinusoidal_position_embedding import (
    SinusoidalPositionEmbedding,
)
from keras_reformer.layers.token_id_check import TokenIdCheck
from keras_reformer.data._token_id_inputs import TokenIdInputs
from keras_reformer.models._calibration import block_layers_only, quantization_stages
from keras_reformer.models._stacks import blocks_in_sync, calibrated_mode

POSITION_EMBEDDINGS = ("axial", "sinusoidal", None)
ATTENTION_TYPES = ("lsh", "local")


def _attention_types(value, num_layers):
    """None -> all "lsh"; else a list of one known type per layer."""
    if value is None:
        return ["lsh"] * num_layers
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            "`attention_types` must be None or a list of one attention type "
            f"per layer, each one of {list(ATTENTION_TYPES)}. "
            f"Received: attention_types={value!r}"
        )
    if len(value) != num_layers:
        raise ValueError(
            f"`attention_types` must name one attention type per layer "
            f"({num_layers} for num_layers={num_layers}). "
            f"Received: attention_types={list(value)!r} ({len(value)} entries)"
        )
    for kind in value:
        _checks.one_of("attention_types", kind, ATTENTION_TYPES)
    return list(value)


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerBackbone(TokenIdInputs, keras_hub.models.Backbone):
    """The Reformer network: LSH attention in a reversible stack with chunked FFNs.

    A keras-hub `Backbone`, functional (built in `__init__`):

        token ids (+ padding mask) -> Embedding -> + position embedding
        [-> + ShortConvolution] -> [x, x] -> ReversibleSequence of num_layers x
           (LayerNorm -> LSHAttention, LayerNorm -> ChunkedFeedForward)
        -> concat(y1, y2) -> LayerNorm

    `ReformerCausalLM` puts the vocabulary head, the loss and `generate()`
    on top of it. Everything keras-hub does with a backbone works on it:
    `from_preset` / `save_to_preset`, `enable_lora(rank)` (which reaches the
    attention's shared-QK and value projections, also with stacked weights
    and inside the reversible recomputation) and `quantize(mode)`.
    (The calibrated modes "gptq" and "awq" are refused: they run a model's
    blocks one after another, which a reversible stack's (f, g) pairs on
    two streams are not.) `keras_reformer.models.ReformerModel` is this
    class under the name the library has always used.

    The layers are attributes: `token_embedding`, `position_embedding`
    (None without one), `short_convolution` (None without one),
    `embedding_dropout`, `reversible_stack` (its `blocks` are the
    `(AttentionBlock, FeedForwardBlock)` pairs), `final_norm`.

    Inputs are a dict: `"token_ids"` (int32, `(batch, length)`, any length up
    to `max_sequence_length`) and `"padding_mask"` (`(batch, length)`, 1 for
    real tokens, 0 for padding). A token id outside `[0, vocabulary_size)`
    is an error naming it, also under XLA: `fit`, `evaluate`, `predict` and
    `*_on_batch` check their inputs before the compiled step (arrays at
    once, datasets batch by batch in tf.data). Output: the final hidden
    states `(batch, length, 2 * hidden_dim)` (the two reversible streams,
    concatenated and normalized), for `ReformerCausalLM` or a head of your
    own, e.g.

        encoder = ReformerBackbone(vocab, causal=False)
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
            per round. A reach of 2 costs 1.5x the attention's work.
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
        attention_types: None (every layer "lsh", the default) or a list of
            one attention type per layer, "lsh" or "local"
            (`LocalAttention`): e.g. `["local", "lsh"] * 3`. Local layers
            see their neighbourhood exactly and cost less; hashed layers
            reach far. `bucket_size`, `num_hashes`, `num_buckets`,
            `num_chunks_before` and `value_shift` apply to the "lsh" layers.
            Stacked weights need layers of one type: with mixed types each
            block keeps its own weights, whatever `stack_weights` says.
        local_chunk_length, local_num_chunks_before, local_num_chunks_after:
            the "local" layers' `chunk_length` (default 64) and windows
            (default 1 and 0).
        local_attention_dropout: dropout on the "local" layers' attention
            probabilities (default None: `attention_dropout`).
        hidden_activation: the FFN's activation (default "gelu").
        attention_bias: bool, biases in the attention projections (default
            True).
        axial_dims: `(d1, d2)` of the axial embedding (default halves).
        layer_norm_epsilon: of every LayerNorm (default 1e-6).
        reference_rules: bool. If True, the "lsh" layers follow the
            reference implementation's rules (`LSHAttention(
            reference_rules=True)`: what pretrained Reformers imported with
            `ReformerCausalLM.from_transformers` need), padding the input
            to a multiple of the least common multiple of the chunk lengths
            as the reference model does. Causal outputs are then not
            prefix-stable; `ReformerCausalLM.generate` reruns the full pass
            for every token. Defaults to False.
        causal: True for a language model, False for an encoder.
        reversible: False computes the same function with ordinary autodiff.
        stack_weights: bool. If True (default), the reversible stack holds
            each kind of block weight as one `(num_layers, ...)` variable
            (`ReversibleSequence(stack_weights=True)`): under XLA the
            compiled step then stops growing with depth (see
            docs/benchmarks.md, "Stacked weights"). `reversible_stack`'s
            variables are then the trained ones; the blocks' layers are
            their templates (`reversible_stack.block_scope(i)` runs block
            `i` on its trained weights, `sync_blocks()` writes them into
            the blocks). False keeps one set of variables per block (the
            default before version 0.2, and what a saved config without
            this key loads as). Saved weights load into either setting.
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
        seed=None,
        stack_weights=True,
        attention_types=None,
        local_chunk_length=64,
        local_num_chunks_before=1,
        local_num_chunks_after=0,
        local_attention_dropout=None,
        hidden_activation="gelu",
        attention_bias=True,
        axial_dims=None,
        layer_norm_epsilon=1e-6,
        reference_rules=False,
        dtype=None,
        **kwargs,
    ):
        _checks.positive_int("vocabulary_size", vocabulary_size)
        _checks.positive_int("num_layers", num_layers)
        _checks.positive_int("hidden_dim", hidden_dim)
        _checks.positive_int("num_heads", num_heads)
        key_dim = (_checks.positive_int("key_dim", key_dim, allow_none=True)
                   or max(1, hidden_dim // num_heads))
        intermediate_dim = (
            _checks.positive_int("intermediate_dim", intermediate_dim, allow_none=True)
            or 4 * hidden_dim
        )
        _checks.positive_int("feedforward_chunk_size", feedforward_chunk_size)
        _checks.positive_int("max_sequence_length", max_sequence_length)
        _checks.non_negative_int("num_chunks_before", num_chunks_before)
        _checks.positive_int("short_convolution", short_convolution, allow_none=True)
        _checks.rate("dropout", dropout)
        _checks.rate("attention_dropout", attention_dropout)
        causal = _checks.boolean("causal", causal)
        reversible = _checks.boolean("reversible", reversible)
        stack_weights = _checks.boolean("stack_weights", stack_weights)
        _checks.one_of("position_embedding", position_embedding, POSITION_EMBEDDINGS)
        attention_types = _attention_types(attention_types, num_layers)
        _checks.positive_int("local_chunk_length", local_chunk_length)
        _checks.non_negative_int("local_num_chunks_before", local_num_chunks_before)
        _checks.non_negative_int("local_num_chunks_after", local_num_chunks_after)
        attention_bias = _checks.boolean("attention_bias", attention_bias)
        if local_attention_dropout is not None:
            _checks.rate("local_attention_dropout", local_attention_dropout)
        reference_rules = _checks.boolean("reference_rules", reference_rules)
        _checks.positive_number("layer_norm_epsilon", layer_norm_epsilon)
        seed = resolve_seed(seed)

        value_shift = _checks.boolean("value_shift", value_shift)
        if value_shift and not causal:
            raise ValueError(
                "`value_shift=True` needs `causal=True` (a key brings the value of "
                f"the next position). Received: value_shift=True, causal={causal}"
            )

        # === Layers ===
        self.token_id_check = TokenIdCheck(
            vocabulary_size, dtype=dtype, name="token_id_check"
        )
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, dtype=dtype, name="token_embedding",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.position_embedding = None
        if position_embedding == "axial":
            self.position_embedding = AxialPositionEmbedding(
                max_sequence_length, axial_shape=axial_shape, axial_dims=axial_dims,
                dtype=dtype, name="position_embedding",
            )
        elif position_embedding == "sinusoidal":
            self.position_embedding = SinusoidalPositionEmbedding(
                max_sequence_length, dtype=dtype, name="position_embedding"
            )
        self.short_convolution = None
        if short_convolution is not None:
            self.short_convolution = ShortConvolution(
                short_convolution, causal=causal, dtype=dtype, name="short_convolution"
            )
        self.embedding_dropout = Dropout(
            dropout, seed=seed, dtype=dtype, name="embedding_dropout"
        )
        # The bucket count comes from max_sequence_length, never from a
        # batch's (padded) length: padding must not change real outputs,
        # and cached decoding needs a count that does not grow with the text.
        attention_kwargs = dict(bucket_size=bucket_size, num_hashes=num_hashes,
                                num_buckets=num_buckets,
                                max_length=max_sequence_length)
        if value_shift:
            attention_kwargs["value_shift"] = True
        if num_chunks_before != 1:
            attention_kwargs["num_chunks_before"] = num_chunks_before
        local_kwargs = dict(chunk_length=local_chunk_length,
                            num_chunks_before=local_num_chunks_before,
                            num_chunks_after=local_num_chunks_after)
        if local_attention_dropout is not None:
            local_kwargs["dropout"] = local_attention_dropout
        if not attention_bias:
            attention_kwargs["use_bias"] = local_kwargs["use_bias"] = False
        if reference_rules:
            attention_kwargs["reference_rules"] = True
            if "local" in attention_types:
                attention_kwargs["pad_multiple"] = math.lcm(bucket_size, local_chunk_length)
        kwargs_of = {"lsh": attention_kwargs, "local": local_kwargs}
        blocks = [
            (
                AttentionBlock(
                    num_heads, key_dim, causal=causal, dropout=dropout,
                    attention_dropout=attention_dropout,
                    seed=(seed + 10 * i + 1) % SEED_LIMIT,
                    attention_kwargs=kwargs_of[kind], attention_type=kind,
                    layer_norm_epsilon=layer_norm_epsilon,
                    dtype=dtype, name=f"attention_block_{i}",
                ),
                FeedForwardBlock(
                    intermediate_dim, chunk_size=feedforward_chunk_size,
                    activation=hidden_activation, dropout=dropout,
                    seed=(seed + 10 * i + 5) % SEED_LIMIT,
                    layer_norm_epsilon=layer_norm_epsilon, dtype=dtype,
                    name=f"feed_forward_block_{i}",
                ),
            )
            for i, kind in enumerate(attention_types)
        ]
        # One loop body, hence one stack of weights, needs one block structure.
        one_type = len(set(attention_types)) == 1
        self.reversible_stack = ReversibleSequence(
            blocks, reversible=reversible, stack_weights=stack_weights and one_type,
            dtype=dtype,
            name="reversible_stack",
        )
        self.final_norm = LayerNorm(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm")

        # === Functional model ===
        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
        mask = keras.ops.cast(padding_mask, "bool")
        x = self.embed(token_ids, mask)
        y1, y2 = self.reversible_stack([x, x], mask=[mask, mask])
        # The streams concatenated and normalized; the norm's gradient keeps
        # the two streams (which the stack's backward pass keeps anyway), not
        # their concatenation.
        outputs = self.final_norm([y1, y2])
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
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
        self.position_embedding_type = position_embedding
        self.short_convolution_width = short_convolution
        self.value_shift = value_shift
        self.causal = causal
        self.reversible = reversible
        self.seed = seed
        self.stack_weights = stack_weights
        self.attention_types = attention_types
        self.local_chunk_length = local_chunk_length
        self.local_num_chunks_before = local_num_chunks_before
        self.local_num_chunks_after = local_num_chunks_after
        self.local_attention_dropout = local_attention_dropout
        self.hidden_activation = hidden_activation
        self.attention_bias = attention_bias
        self.axial_dims = axial_dims
        self.layer_norm_epsilon = layer_norm_epsilon
        self.reference_rules = reference_rules

    def get_config(self):
        # Backbone's: name, trainable and the dtype policy (a policy map
        # naming the quantized layers, so that a quantized model reloads).
        config = super().get_config()
        config.update({
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
            "position_embedding": self.position_embedding_type,
            "short_convolution": self.short_convolution_width,
            "value_shift": self.value_shift,
            "causal": self.causal,
            "reversible": self.reversible,
            "seed": self.seed,
            "stack_weights": self.stack_weights,
            "attention_types": self.attention_types,
            "local_chunk_length": self.local_chunk_length,
            "local_num_chunks_before": self.local_num_chunks_before,
            "local_num_chunks_after": self.local_num_chunks_after,
            "local_attention_dropout": self.local_attention_dropout,
            "hidden_activation": self.hidden_activation,
            "attention_bias": self.attention_bias,
            "axial_dims": self.axial_dims,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "reference_rules": self.reference_rules,
        })
        return config

    @classmethod
    def from_config(cls, config):
        # Saved before stacked weights were the default: per-block weights.
        return super().from_config({"stack_weights": False, **config})

    # ---------------------------------------- keras-hub: LoRA, quantization

    def default_lora_layer_names(self):
        """The layers `enable_lora(rank)` targets by default: keras-hub's
        names, and the attention's shared-QK (`"qk"`) and value projections."""
        return ["qk"] + list(super().default_lora_layer_names())

    def enable_lora(self, rank, target_layer_names=None):
        """keras-hub's `Backbone.enable_lora`: freezes every weight and adds
        rank-`rank` LoRA weights to the target layers (by default the
        attention's `qk` and `value` projections of every block). With
        stacked weights the stack then holds the LoRA weights too, one
        `(num_layers, ...)` variable each, and trains them; the stacked
        kernels keep their trained values."""
        with blocks_in_sync(self):
            super().enable_lora(rank, target_layer_names=target_layer_names)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`, also with stacked weights: the stack's
        blocks are quantized from their trained values (see
        `ReversibleSequence.quantize`).

        The calibrated modes ("gptq", "awq", with Keras' `GPTQConfig` /
        `AWQConfig` holding the calibration texts and a tokenizer) quantize
        the reversible blocks' layers, calibrated on the activations the
        forward pass gives them; the embedding stays as it is.
        """
        if calibrated_mode(mode, config):
            filters = block_layers_only(self, filters)
        with blocks_in_sync(self):
            super().quantize(mode, config=config, filters=filters, **kwargs)

    def embed(self, token_ids, padding_mask, training=None):
        """The layers before the reversible stack: token embedding, position
        embedding, short convolution and embedding dropout; `padding_mask`
        (B, L) bool. The stack's two streams both start from the result."""
        x = self.token_embedding(self.token_id_check(token_ids))
        if self.position_embedding is not None:
            x = x + self.position_embedding(x)
        if self.short_convolution is not None:
            x = x + self.short_convolution(x, mask=padding_mask)
        return self.embedding_dropout(x, training=training)

    def save_own_variables(self, store):
        # Keras 3.15 writes GPTQ/AWQ `EinsumDense` weights without their zero
        # points and then cannot load them: refuse here rather than write a
        # file that does not load.
        modes = {
            getattr(layer, "quantization_mode", None) for layer in self._flatten_layers()
        }
        calibrated = sorted(m for m in modes if calibrated_mode(m, None))
        if calibrated:
            raise ValueError(
                f"A model quantized with {calibrated[0]!r} cannot be saved with "
                f"Keras {keras.__version__}: Keras writes the calibrated modes' "
                "weights without their zero points, and the file does not load "
                "again. Save the float model and call `quantize` after loading "
                "it; 'int8', 'int4' and 'float8' models save and reload."
            )
        super().save_own_variables(store)

    def get_quantization_layer_structure(self, mode=None):
        """The stages Keras' calibrated modes run (see `quantize`): the
        embedding, then one stage per reversible (f, g) block on both
        streams. None for the other modes."""
        if not calibrated_mode(mode, None):
            return None
        return quantization_stages(self)

    def set_num_hashes(self, num_hashes):
        """Change the hash rounds of every LSH attention layer (no retraining).

        E.g. more rounds for evaluation than for training. The new value is
        in `get_config()` (and so in a `.keras` file saved afterwards); the
        compiled predict/evaluate/train functions are retraced.
        """
        num_hashes = _checks.positive_int("num_hashes", num_hashes)
        for f, _ in self.reversible_stack.blocks:
            if f.attention_type != "lsh":
                continue
            f.attention.num_hashes = num_hashes
            f.attention_kwargs["num_hashes"] = num_hashes
        self.num_hashes = num_hashes
        # Traced functions baked the old value in.
        self.predict_function = self.test_function = self.train_function = None

# The name the library has always used for the backbone.
ReformerModel = ReformerBackbone
