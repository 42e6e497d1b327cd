"""ReformerCausalLM: a causal language model task around a ReformerModel backbone."""

import json
import math
import random

import keras
import numpy as np
import tensorflow as tf

from keras_reformer import samplers as samplers_lib
from keras_reformer.models.reformer_causal_lm_decoder import CachedDecoder
from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor,
)
from keras_reformer.models._token_id_inputs import TokenIdInputs
from keras_reformer.models.reformer_model import ReformerModel

# Prompts are trimmed to their longest row, rounded up to a power of two (at
# least this), so that a compiled loop serves many prompt lengths: one trace
# per power of two instead of one per length.
MIN_PROMPT_BUCKET = 16


def _is_strings(x):
    if isinstance(x, str):
        return True
    if isinstance(x, (tf.Tensor, np.ndarray)):
        return x.dtype in (tf.string, object) or getattr(x.dtype, "kind", "") in "SUO"
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(s, (str, bytes)) for s in x)
    return False


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLM(TokenIdInputs, keras.Model):
    """A causal language model: backbone + LM head + loss + `generate()`.

    The keras-hub task pattern (`CausalLM`): the `ReformerModel` backbone
    maps `{"token_ids", "padding_mask"}` to hidden states (or logits, if it
    was built with its head); this task owns the vocabulary projection (the
    backbone's `logits` layer, or a `Dense` head of its own for a headless
    backbone), the loss and `compile()` defaults, and `generate()`. With a
    `preprocessor`, `fit`, `evaluate`, `predict` and `generate` take text.

    `generate()` runs one compiled function (XLA by default): a pass over
    the prompts that fills a cache per attention layer, then a
    `tf.while_loop` that samples one token per step with cached LSH
    attention. A step costs the same whatever the prompt length (it reads
    `num_hashes * num_chunks_before * bucket_size` cached keys per layer
    and head) and gives the same logits as a full pass over the same tokens.

    Args:
        backbone: a causal `ReformerModel`.
        preprocessor: optional `ReformerCausalLMPreprocessor` (text in/out).

    Example:

    >>> backbone = kr.models.ReformerModel(258, max_sequence_length=512)
    >>> lm = kr.models.ReformerCausalLM(
    ...     backbone, kr.models.ReformerCausalLMPreprocessor(sequence_length=256))
    >>> lm.fit(tf.data.Dataset.from_tensor_slices(texts).batch(8), epochs=1)
    >>> lm.generate("def main(", max_length=200)
    """

    def __init__(self, backbone, preprocessor=None, **kwargs):
        if not isinstance(backbone, ReformerModel):
            raise ValueError(
                "`backbone` must be a keras_reformer ReformerModel. Received: "
                f"backbone={type(backbone).__name__}"
            )
        if not backbone.causal:
            raise ValueError(
                "ReformerCausalLM needs a causal backbone (ReformerModel(..., "
                "causal=True)); a bidirectional one sees the tokens it must "
                "predict. Received a backbone with causal=False."
            )
        if preprocessor is not None:
            if not isinstance(preprocessor, ReformerCausalLMPreprocessor):
                raise ValueError(
                    "`preprocessor` must be None or a "
                    "ReformerCausalLMPreprocessor. Received: "
                    f"preprocessor={type(preprocessor).__name__}"
                )
            if preprocessor.vocabulary_size > backbone.vocabulary_size:
                raise ValueError(
                    "The preprocessor emits ids up to "
                    f"{preprocessor.vocabulary_size - 1} (bytes, start and end "
                    "tokens); the backbone's vocabulary_size must be at least "
                    f"{preprocessor.vocabulary_size}. Received: "
                    f"vocabulary_size={backbone.vocabulary_size}"
                )
        inputs = backbone.input
        outputs = backbone(inputs)
        head = None
        if not backbone.include_head:
            head = keras.layers.Dense(
                backbone.vocabulary_size, dtype=backbone.dtype_policy, name="lm_head"
            )
            outputs = head(outputs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.lm_head = head
        self._generate_functions = {}
        self.compile()

    # ------------------------------------------------------------- compile

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto",
                sampler="top_k", **kwargs):
        """`keras.Model.compile` with language-model defaults.

        Args:
            optimizer: "auto" is Adam(1e-3) with global-norm clipping at 1.0,
                a from-scratch rate (keras-hub's 2e-5 is a fine-tuning rate
                for pretrained weights).
            loss: "auto" is sparse categorical cross-entropy on logits.
            weighted_metrics: "auto" is sparse categorical accuracy (weighted
                by the padding mask that the preprocessor gives as
                `sample_weight`).
            sampler: the `generate()` sampler: a `Sampler` or one of
                "greedy", "random", "top_k", "top_p".
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3, global_clipnorm=1.0)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss,
                        weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = samplers_lib.get(sampler)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None:
            config = dict(config)
            config["sampler"] = samplers_lib.serialize(self.sampler)
        return config

    def compile_from_config(self, config):
        # A .keras file restores the optimizer, loss, metrics and sampler.
        config = dict(config)
        sampler = samplers_lib.get(config.pop("sampler", "top_k"))
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config, sampler=sampler)
        if self.built and self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------ text in fit/predict

    def _preprocess(self, x, y=None, sample_weight=None, batch_size=None):
        """Strings (arrays or a tf.data.Dataset) -> a dataset of model inputs."""
        if self.preprocessor is None:
            return x, y, sample_weight, batch_size
        if isinstance(x, tf.data.Dataset):
            dataset = x
        elif _is_strings(x):
            data = tuple(v for v in (x, y, sample_weight) if v is not None)
            dataset = tf.data.Dataset.from_tensor_slices(
                data if len(data) > 1 else data[0]
            ).batch(batch_size or 32)
        else:
            return x, y, sample_weight, batch_size
        dataset = dataset.map(
            self.preprocessor, num_parallel_calls=tf.data.AUTOTUNE
        ).prefetch(tf.data.AUTOTUNE)
        return dataset, None, None, None

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None,
            validation_data=None, **kwargs):
        x, y, sample_weight, batch_size = self._preprocess(x, y, sample_weight, batch_size)
        if validation_data is not None and self.preprocessor is not None:
            validation_data = self._preprocess(validation_data)[0]
        return super().fit(x, y, batch_size=batch_size, sample_weight=sample_weight,
                           validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        x, y, sample_weight, batch_size = self._preprocess(x, y, sample_weight, batch_size)
        return super().evaluate(x, y, batch_size=batch_size,
                                sample_weight=sample_weight, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        x, _, _, batch_size = self._preprocess(x, batch_size=batch_size)
        return super().predict(x, batch_size=batch_size, **kwargs)

    # ------------------------------------------------------------ generate

    def _decoder(self):
        head = self.lm_head or self.backbone.get_layer("logits")
        return CachedDecoder(self.backbone, head)

    def _generate_function(self, max_length, sampler, stop_token_ids, jit_compile):
        # A traced loop bakes in the sampler, the stop tokens and each
        # layer's current num_hashes; anything else (seed, ids) is an input.
        decoder = self._decoder()
        # The seed is an input of the traced loop, not part of its key.
        described = samplers_lib.serialize(sampler)
        described["config"] = {
            k: v for k, v in described.get("config", {}).items() if k != "seed"
        }
        key = (
            max_length, json.dumps(described, sort_keys=True, default=str),
            tuple(stop_token_ids), bool(jit_compile),
            tuple(f.attention.num_hashes for f, _ in decoder.blocks),
        )
        if key not in self._generate_functions:
            # Static shapes (XLA): prompts come padded to a power of two, so
            # retracing is bounded by log2(max_length) shapes per batch size.
            @tf.function(jit_compile=bool(jit_compile))
            def run(token_ids, padding_mask, seed):
                return decoder.generate(
                    token_ids, padding_mask, seed, max_length=max_length,
                    sampler=sampler, stop_token_ids=tuple(stop_token_ids),
                    # Graph mode would copy the caches at every step.
                    in_place=not jit_compile,
                )

            self._generate_functions[key] = run
        return self._generate_functions[key]

    def generate(self, inputs, max_length=None, stop_token_ids="auto",
                 strip_prompt=False, sampler=None, jit_compile=True):
        """Continue prompts, with cached decoding in one compiled loop.

        Args:
            inputs: a string or a list / 1-D tensor of strings (needs a
                preprocessor), a `tf.data.Dataset` of those (batched), or
                token ids: `{"token_ids", "padding_mask"}` (right-padded,
                `(batch, length)` or one `(length,)` row) or just an int
                array of ids (no padding).
            max_length: int, total length of each output row (prompt plus
                generated), at most the backbone's `max_sequence_length`.
                Default: the preprocessor's `sequence_length`, else the
                backbone's `max_sequence_length`.
            stop_token_ids: tokens that end a row (it is kept, what follows
                is padding); "auto" is the preprocessor's end token (none
                without a preprocessor); None or () never stops early.
            strip_prompt: return only the generated part.
            sampler: overrides the compiled sampler for this call.
            jit_compile: compile the loop with XLA (default True), or run it
                as a TensorFlow graph (False: no compilation, the caches are
                updated in place; a step costs more fixed op overhead).

        Returns:
            Strings for string inputs (a str for one prompt, else a list),
            else a dict of numpy `token_ids` and `padding_mask`
            `(batch, max_length)` (or `(max_length,)` for one row).
        """
        if isinstance(inputs, tf.data.Dataset):
            outputs = [
                self.generate(batch, max_length, stop_token_ids, strip_prompt,
                              sampler, jit_compile)
                for batch in inputs
            ]
            if outputs and isinstance(outputs[0], dict):
                return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
            return [s for o in outputs for s in ([o] if isinstance(o, str) else o)]

        limit = self.backbone.max_sequence_length
        if max_length is None:
            max_length = (self.preprocessor.sequence_length
                          if self.preprocessor is not None else limit)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not (
            1 <= max_length <= limit
        ):
            raise ValueError(
                "`max_length` must be an integer in [1, max_sequence_length="
                f"{limit}] (the backbone's position limit). Received: "
                f"max_length={max_length!r}"
            )
        sampler = self.sampler if sampler is None else samplers_lib.get(sampler)

        strings = _is_strings(inputs)
        if strings:
            if self.preprocessor is None:
                raise ValueError(
                    "generate() got strings but this ReformerCausalLM has no "
                    "preprocessor; pass token ids ({'token_ids', "
                    "'padding_mask'}) or give it a ReformerCausalLMPreprocessor."
                )
            single = isinstance(inputs, str) or (
                isinstance(inputs, tf.Tensor) and inputs.shape.rank == 0
            )
            packed = self.preprocessor.generate_preprocess(
                tf.reshape(tf.convert_to_tensor(inputs), [-1]), max_length
            )
            ids = packed["token_ids"].numpy()
            mask = packed["padding_mask"].numpy()
        else:
            if isinstance(inputs, dict):
                ids = np.asarray(inputs["token_ids"])
                mask = inputs.get("padding_mask")
                mask = np.ones_like(ids) if mask is None else np.asarray(mask)
            else:
                ids = np.asarray(inputs)
                mask = np.ones_like(ids)
            single = ids.ndim == 1
            if single:
                ids, mask = ids[None], mask[None]
        ids, mask = self._check_prompts(ids, mask, max_length)

        if stop_token_ids == "auto":
            stop_token_ids = (
                (self.preprocessor.end_token_id,) if self.preprocessor is not None else ()
            )
        stop_token_ids = tuple(int(t) for t in (stop_token_ids or ()))

        lengths = mask.sum(axis=1)
        if lengths.min() >= max_length:
            out_ids, out_mask = ids[:, :max_length], mask[:, :max_length].astype(bool)
        else:
            prompt = min(max_length, max(
                MIN_PROMPT_BUCKET, 2 ** math.ceil(math.log2(max(1, lengths.max())))
            ))
            ids, mask = ids[:, :prompt], mask[:, :prompt]
            if ids.shape[1] < prompt:
                pad = [[0, 0], [0, prompt - ids.shape[1]]]
                ids, mask = np.pad(ids, pad), np.pad(mask, pad)
            seed = sampler.seed if sampler.seed is not None else random.randint(0, 2**30)
            run = self._generate_function(max_length, sampler, stop_token_ids, jit_compile)
            out_ids, out_mask = run(
                tf.constant(ids, tf.int32), tf.constant(mask, tf.int32),
                tf.constant([seed, 0], tf.int32),
            )
            out_ids, out_mask = out_ids.numpy(), out_mask.numpy()

        if strip_prompt:
            # Generated tokens start after each row's prompt: shift them left.
            keep = np.arange(max_length)[None] >= lengths[:, None]
            out_mask = out_mask & keep
            order = np.argsort(~out_mask, axis=1, kind="stable")
            out_ids = np.take_along_axis(np.where(out_mask, out_ids, 0), order, axis=1)
            out_mask = np.take_along_axis(out_mask, order, axis=1)
        result = {"token_ids": out_ids.astype(np.int32), "padding_mask": out_mask}
        if strings:
            texts = [t.decode("utf-8") for t in
                     self.preprocessor.generate_postprocess(result).numpy()]
            return texts[0] if single else texts
        return {k: v[0] for k, v in result.items()} if single else result

    def _check_prompts(self, ids, mask, max_length):
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                "`token_ids` and `padding_mask` must both be (batch, length) "
                f"or (length,). Received: token_ids.shape={ids.shape}, "
                f"padding_mask.shape={mask.shape}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"`token_ids` must be integers. Received dtype={ids.dtype}")
        mask = mask.astype(bool)
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
        vocab = self.backbone.vocabulary_size
        real = ids[mask]
        if real.size and (real.min() < 0 or real.max() >= vocab):
            raise ValueError(
                f"`token_ids` must be in [0, vocabulary_size={vocab}). "
                f"Received ids from {real.min()} to {real.max()}"
            )
        if lengths.max() > max_length:
            raise ValueError(
                f"A prompt is longer ({lengths.max()} tokens) than "
                f"max_length={max_length}."
            )
        return ids.astype(np.int32), mask.astype(np.int32)

    # -------------------------------------------------------------- config

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "preprocessor": (
                None if self.preprocessor is None
                else keras.saving.serialize_keras_object(self.preprocessor)
            ),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(
                config["preprocessor"]
            )
        return cls(**config)
