"""ReformerCausalLMPreprocessor: strings -> byte ids for a causal LM, on
keras-hub's `CausalLMPreprocessor`."""

import keras
import numpy as np
import tensorflow as tf
from keras_hub.models import CausalLMPreprocessor
from keras_hub.tokenizers import Tokenizer

from keras_reformer import _checks
from keras_reformer._compat import keras_hub_presets
from keras_reformer._compat import keras_hub_tensor_utils
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer
from keras_reformer.models.reformer_tokenizer import check_strings
from keras_reformer.models.reformer_tokenizer import local_without_backbone


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLMPreprocessor(CausalLMPreprocessor):
    """Byte-level preprocessing for `ReformerCausalLM`: keras-hub's
    `CausalLMPreprocessor` with a `ReformerTokenizer`.

    Token ids are the UTF-8 bytes of the text (0..255), plus a start token
    (256) and an end token (257): a backbone needs `vocabulary_size >= 258`
    (`preprocessor.vocabulary_size`).

    Called on strings (one string, or a 1-D batch; in `tf.data` either an
    unbatched or a batched pipeline) it tokenizes, packs
    `[start] + bytes + [end]` into `sequence_length + 1` ids (the bytes are
    cut so that the special tokens always fit; then right padding with id 0)
    and returns keras-hub's training triple `(x, y, sample_weight)`:
    `x = {"token_ids", "padding_mask"}` (the first `sequence_length` ids),
    `y` (the next ids) and `sample_weight` (the padding mask of `y`). Both
    padding masks are bool, as keras-hub emits them.

    `generate_preprocess(x, sequence_length)` packs prompts (start token,
    no end token) and `generate_postprocess` turns `{"token_ids",
    "padding_mask"}` back into text, dropping padding (by the mask) and the
    special tokens.

    Eager calls run keras-hub's Python path (backend tensors out, python
    strings from `generate_postprocess`); inside `tf.function` and
    `tf.data` the TensorFlow path runs, with core TensorFlow ops only for a
    `ReformerTokenizer`: tokenizing, packing and `generate_postprocess`
    (`DecodeRaw`, `ReduceJoin`, `UnicodeTranscode`, ragged tensors), so a
    graph exported with them loads in stock TensorFlow and TF Serving.

    Args:
        tokenizer: a `ReformerTokenizer` (or another keras-hub `Tokenizer`
            with `end_token_id`, `pad_token_id` and, when
            `add_start_token`, `start_token_id`, such as the
            `ReformerSentencePieceTokenizer` of an imported checkpoint).
            None makes a `ReformerTokenizer()`.
        sequence_length: int, the packed length of training examples and
            the default length of `generate_preprocess`.
        add_start_token: bool, prepend the start token (False for a
            tokenizer without one, e.g. `ReformerTokenizer(byte_offset=2)`).
        add_end_token: bool, append the end token (in training examples).

    Example:

    >>> pre = ReformerCausalLMPreprocessor(sequence_length=8)
    >>> x, y, w = pre(["abc"])
    >>> x["token_ids"].numpy()
    array([[256,  97,  98,  99, 257,   0,   0,   0]], dtype=int32)
    >>> x["padding_mask"].numpy()
    array([[ True,  True,  True,  True,  True, False, False, False]])
    >>> y.numpy()
    array([[ 97,  98,  99, 257,   0,   0,   0,   0]], dtype=int32)
    >>> prompt = pre.generate_preprocess(["abc"], sequence_length=6)
    >>> prompt["token_ids"].numpy()
    array([[256,  97,  98,  99,   0,   0]], dtype=int32)
    >>> pre.generate_postprocess(prompt)
    ['abc']
    >>> dataset = tf.data.Dataset.from_tensor_slices(["abc", "de"])
    >>> dataset = dataset.batch(2).map(pre)
    """

    backbone_cls = ReformerBackbone
    tokenizer_cls = ReformerTokenizer

    def __init__(
        self,
        tokenizer=None,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        if tokenizer is None:
            tokenizer = ReformerTokenizer()
        _checks.instance(
            "tokenizer", tokenizer, Tokenizer,
            "None or a keras-hub Tokenizer such as `ReformerTokenizer()` "
            "(`sequence_length` is the second argument)",
        )
        add_start_token = _checks.boolean("add_start_token", add_start_token)
        add_end_token = _checks.boolean("add_end_token", add_end_token)
        # The end token also stops generation; a start token is needed only
        # when it is added.
        needed = {"end_token_id": "", "pad_token_id": ""}
        if add_start_token:
            needed["start_token_id"] = (
                " (or pass add_start_token=False: this tokenizer may have none)"
            )
        for name, hint in needed.items():
            # A declared token whose id is unknown yet is fine: a preset
            # builds the tokenizer first and loads its vocabulary after.
            declared = getattr(tokenizer, name[: -len("_id")], None) is not None
            if getattr(tokenizer, name, None) is None and not declared:
                raise ValueError(
                    f"`tokenizer` must define `{name}`{hint}. Received: "
                    f"tokenizer={tokenizer!r} with {name}=None"
                )
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=_checks.positive_int("sequence_length", sequence_length),
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )

    # keras-hub's setter, plus the check (keras-hub's tests set it).
    @CausalLMPreprocessor.sequence_length.setter
    def sequence_length(self, value):
        CausalLMPreprocessor.sequence_length.fset(
            self, _checks.positive_int("sequence_length", value)
        )

    # ---------------------------------------------------- read-only ids

    @property
    def start_token_id(self):
        """The id prepended to every sequence (the tokenizer's)."""
        return self.tokenizer.start_token_id

    @property
    def end_token_id(self):
        """The id appended to training sequences (the tokenizer's)."""
        return self.tokenizer.end_token_id

    @property
    def pad_token_id(self):
        """The id of padding; padding is told apart by the padding mask."""
        return self.tokenizer.pad_token_id

    @property
    def vocabulary_size(self):
        """Ids this preprocessor may emit (258 for a `ReformerTokenizer`)."""
        return self.tokenizer.vocabulary_size()

    # ------------------------------------------------------------ calls

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "ReformerCausalLMPreprocessor makes the labels itself (the "
                "next tokens); pass only strings. Received: "
                f"y={y!r}, sample_weight={sample_weight!r}"
            )
        check_strings("x", x, max_rank=1)
        sequence_length = _checks.positive_int(
            "sequence_length", sequence_length, allow_none=True
        )
        return super().call(x, sequence_length=sequence_length)

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts -> `{"token_ids", "padding_mask"}` of
        `sequence_length` (default: the layer's) columns: start token and
        bytes, no end token, right padding."""
        check_strings("x", x, max_rank=1)
        sequence_length = _checks.positive_int(
            "sequence_length", sequence_length, allow_none=True
        )
        return super().generate_preprocess(x, sequence_length=sequence_length)

    def generate_postprocess(self, x):
        """`{"token_ids", "padding_mask"}` (one row or a batch) -> text, with
        padding (by the mask) and the special tokens dropped; invalid UTF-8
        becomes U+FFFD. Python strings eagerly, a tf.string tensor inside
        `tf.function` / `tf.data`."""
        if not isinstance(x, dict) or not {"token_ids", "padding_mask"} <= set(x):
            raise ValueError(
                "`x` must be a dict with 'token_ids' and 'padding_mask'. "
                f"Received: x={x!r}"
            )
        return super().generate_postprocess(x)

    def _generate_postprocess_python(self, x):
        # keras-hub's Python path indexes with a NumPy mask as given, so an
        # int mask would pick positions instead of masking.
        mask = x["padding_mask"]
        if keras.ops.is_tensor(mask):
            mask = keras.ops.convert_to_numpy(mask)
        x = {**x, "padding_mask": np.asarray(mask).astype(bool)}
        return super()._generate_postprocess_python(x)

    @keras_hub_tensor_utils.preprocessing_function
    def _generate_postprocess_tf(self, x):
        # The base converts to NumPy first, which a traced graph cannot do;
        # these are the same steps on tensors, with core ops only.
        if not self.built:
            self.build(None)
        token_ids = tf.convert_to_tensor(x["token_ids"])
        padding_mask = tf.convert_to_tensor(x["padding_mask"])
        ragged = keras_hub_tensor_utils.strip_to_ragged(
            token_ids, padding_mask, self.tokenizer.special_token_ids
        )
        return self.tokenizer.detokenize(ragged)

    # ---------------------------------------------------------- presets

    @classmethod
    def from_preset(
        cls, preset, config_file=keras_hub_presets.PREPROCESSOR_CONFIG_FILE,
        **kwargs,
    ):
        """Loads a preprocessor from a keras-hub preset.

        A full preset (with the backbone's `config.json`) loads the keras-hub
        way. A local directory written by `preprocessor.save_to_preset`
        alone (no backbone) loads from its preprocessor config.

        Args:
            preset: a preset handle or a local directory.
            config_file: the preprocessor config in the preset.
            **kwargs: overrides of the saved config (e.g. `sequence_length`).
        """
        if local_without_backbone(preset, config_file):
            loader = keras_hub_presets.KerasPresetLoader(preset, config=None)
            return loader.load_preprocessor(cls, config_file, **kwargs)
        return super().from_preset(preset, config_file=config_file, **kwargs)
