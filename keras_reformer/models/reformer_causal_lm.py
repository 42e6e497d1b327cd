"""ReformerCausalLM: a keras-hub `CausalLM` on a `ReformerBackbone`."""

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras import ops

from keras_reformer import _checks, _token_ids, memory
from keras_reformer.models._calibration import block_layers_only
from keras_reformer.models._stacks import blocks_in_sync, calibrated_mode
from keras_reformer.data._token_id_inputs import TokenIdInputs
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_causal_lm_decoder import CachedDecoder
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor,
)
from keras_reformer.ops import buffers
from keras_reformer.ops.recompute import in_xla_context


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLM(TokenIdInputs, keras_hub.models.CausalLM):
    """A causal language model: a `ReformerBackbone`, an LM head, the loss,
    and keras-hub's `generate()`.

    A keras-hub `CausalLM`: with a `preprocessor`, `fit`, `evaluate`,
    `predict` and `generate` take strings; `generate(inputs, max_length,
    stop_token_ids="auto", strip_prompt=False)` runs keras-hub's samplers
    (`compile(sampler=...)`: "greedy", "top_k", "top_p", "random", ... or a
    `keras_hub.samplers.Sampler`) over `call_with_cache`, compiled as
    keras-hub compiles it (`tf.function`, with XLA when the model is
    compiled with `jit_compile=True`). Presets (`save_to_preset`,
    `from_preset`, also through `keras_hub.models.CausalLM.from_preset`),
    `enable_lora` and `quantize` work as on any keras-hub task.

    Cached decoding: `_build_cache` runs one causal pass over the prompts
    that fills a cache per attention layer; each `call_with_cache` step then
    costs the same whatever the length before it (it reads `num_hashes *
    num_chunks_before * bucket_size` cached keys per layer and head) and
    gives the same logits as a full pass over the same tokens.

    Args:
        backbone: a causal `ReformerBackbone`.
        preprocessor: optional `ReformerCausalLMPreprocessor` (text in/out).
        head_dtype: dtype policy of the LM head (default: the backbone's);
            in the config of a model whose head was quantized.

    Example:

    >>> backbone = kr.models.ReformerBackbone(258, max_sequence_length=512)
    >>> lm = kr.models.ReformerCausalLM(
    ...     backbone, kr.models.ReformerCausalLMPreprocessor(sequence_length=256))
    >>> lm.fit(tf.data.Dataset.from_tensor_slices(texts).batch(8), epochs=1)
    >>> lm.generate("def main(", max_length=200)
    """

    backbone_cls = ReformerBackbone
    preprocessor_cls = ReformerCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, head_dtype=None, **kwargs):
        _checks.instance("backbone", backbone, ReformerBackbone,
                         "a keras_reformer ReformerBackbone")
        if not backbone.causal:
            raise ValueError(
                "ReformerCausalLM needs a causal backbone (ReformerBackbone(..., "
                "causal=True)); a bidirectional one sees the tokens it must "
                "predict. Received a backbone with causal=False."
            )
        _checks.instance("preprocessor", preprocessor, ReformerCausalLMPreprocessor,
                         "a ReformerCausalLMPreprocessor", allow_none=True)
        # A preset builds the preprocessor before loading a vocabulary file
        # (SentencePiece): the size is checked when it is known.
        if preprocessor is not None and _vocabulary_known(preprocessor.tokenizer):
            if preprocessor.vocabulary_size > backbone.vocabulary_size:
                raise ValueError(
                    "The preprocessor emits ids up to "
                    f"{preprocessor.vocabulary_size - 1}; the backbone's "
                    "vocabulary_size must be at least "
                    f"{preprocessor.vocabulary_size}. Received: "
                    f"vocabulary_size={backbone.vocabulary_size}"
                )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.lm_head = keras.layers.Dense(
            backbone.vocabulary_size, name="lm_head",
            dtype=backbone.dtype_policy if head_dtype is None else head_dtype,
        )
        # === Functional model ===
        inputs = backbone.input
        outputs = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto",
                sampler="top_k", **kwargs):
        """keras-hub's `CausalLM.compile`, with a from-scratch optimizer.

        Args:
            optimizer: "auto" is Adam(1e-3) with global-norm clipping at 1.0
                (keras-hub's default, Adam(2e-5), is a fine-tuning rate for
                pretrained weights).
            loss: "auto" is sparse categorical cross-entropy on logits.
            weighted_metrics: "auto" is sparse categorical accuracy (weighted
                by the padding mask that the preprocessor gives as
                `sample_weight`).
            sampler: the `generate()` sampler: a name or a
                `keras_hub.samplers.Sampler`.
            **kwargs: as in `keras.Model.compile` (e.g. `jit_compile`).
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3, global_clipnorm=1.0)
        super().compile(optimizer=optimizer, loss=loss,
                        weighted_metrics=weighted_metrics, sampler=sampler, **kwargs)

    def get_config(self):
        config = super().get_config()
        if self.lm_head.quantization_mode is not None:
            # keras-hub's task config holds the backbone's policies only.
            policy = self.lm_head.dtype_policy
            if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
                policy = policy[self.lm_head.path]
            config["head_dtype"] = keras.dtype_policies.serialize(policy)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("head_dtype"), dict):
            config["head_dtype"] = keras.dtype_policies.deserialize(config["head_dtype"])
        return super().from_config(config)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and getattr(self, "sampler", None) is not None:
            config = dict(config, sampler=keras_hub.samplers.serialize(self.sampler))
        return config

    def compile_from_config(self, config):
        # A .keras file restores the optimizer, loss, metrics and sampler.
        config = dict(config)
        sampler = keras_hub.samplers.get(config.pop("sampler", "top_k"))
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config, sampler=sampler)
        if self.built and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------ cached decoding

    def _decoder(self):
        return CachedDecoder(self.backbone, self.lm_head)

    def _build_cache(self, token_ids, padding_mask):
        """The caches for keras-hub's sampling loop, which starts at the
        shortest prompt's length `L` and feeds every later position (a
        longer prompt's own tokens included) through `call_with_cache`: so
        the caches hold each row's positions before `L - 1` only.

        Returns:
            (hidden states (B, max_length, 2 * hidden_dim) of that pass,
             the cache: per block an attention cache, and the short
             convolution's last inputs if there is one; every tensor is
             batch-major, as keras-hub's samplers require).
        """
        decoder = self._decoder()
        max_length = token_ids.shape[1]
        if max_length is None:
            max_length = tf.shape(token_ids)[1]
        mask = tf.cast(padding_mask, tf.bool)
        start = tf.reduce_min(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1))
        cached = mask & (tf.range(tf.shape(mask)[1])[None, :] < start - 1)
        _, hidden, cache = decoder.prompt_pass(token_ids, cached, max_length)
        if not in_xla_context():
            # Steps write the caches in place (graph mode): own the buffers.
            cache = buffers.own(cache)
        return hidden, cache

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One token per row at position `cache_update_index`, from the cache.

        Args:
            token_ids: (B, 1) int32.
            cache: from `_build_cache` or a previous call.
            cache_update_index: int32 scalar, the tokens' position.

        Returns:
            (logits (B, 1, vocabulary_size), hidden states (B, 1, 2 *
            hidden_dim), updated cache).
        """
        token = tf.cast(token_ids[:, 0], tf.int32)
        position = tf.fill(tf.shape(token), tf.cast(cache_update_index, tf.int32))
        # keras-hub's samplers treat every cache tensor as batch-major (beam
        # search repeats and reorders them by row), so what is the same for
        # every row (hash rotations, position embeddings) is made per step.
        logits, hidden, cache = self._decoder().step(
            token, position, cache,
            in_place=not in_xla_context() and not tf.executing_eagerly(),
        )
        return logits[:, None], hidden[:, None], cache

    def make_train_function(self, force=False):
        """Keras', its first call (which compiles the step) returning the
        memory the compiler freed to the system as it runs
        (`keras_reformer.memory`)."""
        super().make_train_function(force=force)
        self.train_function = memory.first_call_returns_freed_memory(self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        """Keras', its first call returning freed memory as
        `make_train_function`'s does."""
        super().make_test_function(force=force)
        self.test_function = memory.first_call_returns_freed_memory(self.test_function)
        return self.test_function

    def make_generate_function(self):
        """keras-hub's, but never XLA for a backbone with `reference_rules`:
        its generation runs full passes over growing prefixes (dynamic
        shapes), see `generate_step`."""
        if self.generate_function is None and self.backbone.reference_rules \
                and not self.run_eagerly:
            self.generate_function = tf.function(self.generate_step, jit_compile=False)
        return super().make_generate_function()

    def _full_pass_next(self, prompt, cache, index):
        """The next-token logits from a full pass over `prompt[:, :index]`:
        with the reference's rules outputs are not prefix-stable, so no
        cache can give them; each token costs a pass over the text so far."""
        prefix = prompt[:, :index]
        features = {"token_ids": prefix, "padding_mask": tf.ones_like(prefix)}
        hidden = self.backbone(features, training=False)[:, -1]
        return tf.cast(self.lm_head(hidden), tf.float32), hidden, cache

    def generate_step(self, inputs, stop_token_ids=None):
        """keras-hub's compilable generation of one batch (see
        `keras_hub.models.GPT2CausalLM.generate_step`, the same loop)."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))
        if self.backbone.reference_rules:
            # Only the contrastive sampler reads the prompt's hidden states;
            # for the others that pass would be one full pass wasted.
            hidden_states = None
            if isinstance(self.sampler, keras_hub.samplers.ContrastiveSampler):
                hidden_states = self.backbone(
                    {"token_ids": token_ids, "padding_mask": padding_mask},
                    training=False)
            cache = tf.zeros(tf.shape(token_ids)[:1])  # nothing to carry
            next = self._full_pass_next
        else:
            hidden_states, cache = self._build_cache(token_ids, padding_mask)

            def next(prompt, cache, index):
                position = index - 1
                batch_size = ops.shape(prompt)[0]
                prompt = ops.slice(prompt, [0, position], [batch_size, 1])
                logits, hidden_states, cache = self.call_with_cache(prompt, cache, position)
                return (ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1),
                        cache)

        token_ids = self.sampler(
            next=next, prompt=token_ids, cache=cache, index=index,
            mask=padding_mask, stop_token_ids=stop_token_ids,
            hidden_states=hidden_states, model=self,
        )
        if stop_token_ids is not None:
            # Everything after a row's first generated stop token is padding.
            stops = ops.convert_to_tensor(list(stop_token_ids), "int32")
            is_stop = ops.any(ops.equal(token_ids[..., None], stops), axis=-1)
            is_stop = ops.logical_and(is_stop, ops.logical_not(padding_mask))
            ends = ops.cast(is_stop, "int32")
            after = ops.cumsum(ends, axis=-1) - ends
            padding_mask = ops.logical_not(ops.cast(after, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate(self, inputs, max_length=None, stop_token_ids="auto",
                 strip_prompt=False):
        """keras-hub's `CausalLM.generate`, with the prompts checked first.

        Token-id prompts must be right-padded `{"token_ids", "padding_mask"}`
        (each row at least one real token, ids in `[0, vocabulary_size)`);
        the padded width is the output length. `max_length` (with a
        preprocessor) may not exceed the backbone's `max_sequence_length`.
        """
        limit = self.backbone.max_sequence_length
        if self.preprocessor is not None:
            if max_length is None:  # the preprocessor's length is the default
                _checks.int_in_range(
                    "preprocessor.sequence_length", self.preprocessor.sequence_length,
                    1, limit, "(the backbone's max_sequence_length; pass a `max_length`)",
                )
            else:
                _checks.int_in_range("max_length", max_length, 1, limit,
                                     "(the backbone's max_sequence_length)")
        if not isinstance(inputs, tf.data.Dataset) and isinstance(inputs, dict):
            self._check_prompts(inputs, limit)
        return super().generate(inputs, max_length=max_length,
                                stop_token_ids=stop_token_ids, strip_prompt=strip_prompt)

    def _check_prompts(self, inputs, limit):
        ids = np.asarray(inputs["token_ids"])
        mask = np.asarray(inputs.get("padding_mask", np.ones_like(ids))).astype(bool)
        if ids.ndim == 1:
            ids, mask = ids[None], mask[None]
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                "`token_ids` and `padding_mask` must both be (batch, length) "
                f"or (length,). Received: token_ids.shape={ids.shape}, "
                f"padding_mask.shape={mask.shape}"
            )
        _token_ids.check_integer_dtype(ids.dtype)
        if ids.shape[1] > limit:
            raise ValueError(
                f"The prompts are {ids.shape[1]} wide, above max_sequence_length="
                f"{limit} (the padded width is the output length)."
            )
        lengths = mask.sum(axis=1)
        if (lengths < 1).any():
            raise ValueError(
                "Every prompt needs at least one real token (a start token "
                f"will do). Received prompt lengths {lengths.tolist()}"
            )
        if (mask != (np.arange(mask.shape[1])[None] < lengths[:, None])).any():
            raise ValueError(
                "`padding_mask` must be right padding (each row: ones, then "
                "zeros); generation continues each row after its last real token."
            )
        # Padding may hold any id: only the real tokens are checked.
        _token_ids.check_token_ids_numpy(np.where(mask, ids, 0),
                                         self.backbone.vocabulary_size)

    @classmethod
    def from_transformers(cls, path, rotations=None, dtype=None, preprocessor="auto"):
        """A pretrained Reformer of HF transformers (`ReformerModelWithLMHead`),
        imported from a local checkpoint directory.

        Reads `config.json` and `model.safetensors` (NumPy only) or
        `pytorch_model.bin` (needs torch), builds the matching backbone
        (`attention_types`, `reference_rules=True`, `attention_bias=False`,
        the config's activation, axial layout and LayerNorm epsilon) and
        assigns every tensor; a config it cannot reproduce, or a tensor left
        over or missing, is a `ValueError` naming it. See docs/import.md.

        Args:
            path: the checkpoint directory (download it yourself, e.g. with
                `huggingface-cli download google/reformer-enwik8 --local-dir
                DIR`).
            rotations: None, or the reference's hash rotations, shape
                `(num_heads, key_dim, num_hashes, sum(num_buckets) / 2)`, for
                every LSH layer. The reference draws fresh rotations at every
                call unless its config sets `hash_seed`, and then draws them
                with torch's generator; without `rotations` each LSH layer
                draws fixed ones from the backbone's `seed` (the config's
                `hash_seed` when set), so outputs are deterministic but not
                the reference's numbers.
            dtype: the model's dtype policy (default: Keras' global one).
            preprocessor: `"auto"` (the checkpoint's tokenizer, below), None
                (no preprocessor: `fit`, `predict` and `generate` take token
                ids) or a `ReformerCausalLMPreprocessor` of your own.

        Returns:
            A `ReformerCausalLM`. With `preprocessor="auto"` it holds the
            checkpoint's tokenizer: a `ReformerSentencePieceTokenizer` when the directory
            has `spiece.model` (crime-and-punishment), a
            `ReformerTokenizer(byte_offset=2)` (UTF-8 bytes + 2) for a
            vocabulary of 258 without one (enwik8); neither adds a start
            token, as the reference's do not. Other checkpoints get no
            preprocessor and take token ids.
        """
        from keras_reformer.convert import transformers_reformer

        return transformers_reformer.from_transformers(
            cls, path, rotations, dtype, preprocessor
        )

    def set_num_hashes(self, num_hashes):
        """The backbone's `set_num_hashes` (hash rounds of every attention
        layer, e.g. more for evaluation); the task's traced functions
        (predict, evaluate, fit, generate) are traced again."""
        self.backbone.set_num_hashes(num_hashes)
        self.generate_function = None
        self.predict_function = self.test_function = self.train_function = None

    # ---------------------------------------------- LoRA and quantization

    def enable_lora(self, rank, target_layer_names=None):
        """LoRA fine-tuning: the backbone's `enable_lora` (see
        `ReformerBackbone.enable_lora`), and the LM head frozen too, so that
        only the LoRA weights train."""
        self.backbone.enable_lora(rank, target_layer_names=target_layer_names)
        self.lm_head.trainable = False
        self.generate_function = None
        self.train_function = self.test_function = self.predict_function = None

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`, also with stacked weights (see
        `ReformerBackbone.quantize`). "int8", "int4" and "float8" quantize
        the head too; the calibrated modes ("gptq", "awq") quantize the
        reversible blocks' layers only, calibrated on the activations of the
        backbone's forward pass, e.g.
        `lm.quantize("gptq", config=keras.quantizers.GPTQConfig(texts,
        lm.preprocessor.tokenizer, sequence_length=512))`."""
        if calibrated_mode(mode, config):
            filters = block_layers_only(self.backbone, filters)
        with blocks_in_sync(self):
            super().quantize(mode, config=config, filters=filters, **kwargs)
        self.generate_function = None

    def get_quantization_layer_structure(self, mode=None):
        """The backbone's stages for the calibrated modes (see
        `ReformerBackbone.get_quantization_layer_structure`)."""
        return self.backbone.get_quantization_layer_structure(mode)


def _vocabulary_known(tokenizer):
    """False for a vocabulary-file tokenizer whose file is not loaded yet."""
    return getattr(tokenizer, "proto", True) is not None
