"""ReformerTokenizer: UTF-8 bytes plus special tokens, on keras-hub's
`ByteTokenizer`."""

import os

import keras
import numpy as np
import tensorflow as tf
from keras_hub.tokenizers import ByteTokenizer

from keras_reformer import _checks
from keras_reformer._compat import keras_hub_presets
from keras_reformer._compat import keras_hub_tensor_utils
from keras_reformer.models.reformer_backbone import ReformerBackbone
from keras_reformer.text import byte_tokenizer

START_TOKEN = "<s>"
END_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
START_TOKEN_ID = byte_tokenizer.VOCABULARY_SIZE  # 256
END_TOKEN_ID = byte_tokenizer.VOCABULARY_SIZE + 1  # 257
# 0 is also the byte "\x00": padding is told apart by the padding mask.
PAD_TOKEN_ID = 0

# The id layouts, by `byte_offset`: the special tokens (attribute, token,
# id). Offset 0 is the library's own; offset 2 is tensor2tensor's byte
# encoder (padding 0, end of sequence 1, byte b at b + 2), which the
# pretrained reformer-enwik8 was trained with.
_SPECIAL_TOKENS = {
    0: (("start_token", START_TOKEN, START_TOKEN_ID),
        ("end_token", END_TOKEN, END_TOKEN_ID)),
    2: (("pad_token", PAD_TOKEN, 0), ("end_token", END_TOKEN, 1)),
}

# `ByteTokenizer` options that `ReformerTokenizer` fixes (see the class doc).
_FIXED = {
    "lowercase": False,
    "normalization_form": None,
    "errors": "replace",
    "replacement_char": 0xFFFD,
}


def _leaves(value):
    """The elements of a (nested) python list or tuple."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _depth(value):
    """How deeply python lists/tuples nest (the rank of a string list)."""
    depth = 0
    while isinstance(value, (list, tuple)):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


def check_strings(name, value, max_rank=None):
    """Raises a TypeError unless `value` holds strings, and a ValueError if
    its rank is above `max_rank`. Returns the rank (None if unknown)."""
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        return 0
    if isinstance(value, (tf.Tensor, tf.RaggedTensor)):
        ok, rank = value.dtype == tf.string, value.shape.rank
    elif isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            ok = all(isinstance(v, (str, bytes)) for v in value.ravel())
        else:
            ok = value.dtype.kind in "SU"
        rank = value.ndim
    elif isinstance(value, (list, tuple)):
        ok = all(isinstance(v, (str, bytes, np.str_, np.bytes_))
                 for v in _leaves(value))
        rank = _depth(value)
    else:
        ok, rank = False, None
    if not ok:
        raise TypeError(
            f"`{name}` must be a string or strings (python, NumPy or "
            f"tf.string). Received: {name}={_checks.describe(value)}"
        )
    if max_rank is not None and rank is not None and rank > max_rank:
        raise ValueError(
            f"`{name}` must be a string or a 1-D batch of strings (rank <= "
            f"{max_rank}). Received rank {rank}: {name}={_checks.describe(value)}"
        )
    return rank


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerTokenizer(ByteTokenizer):
    """The byte tokenizer of Reformer language models.

    Token ids are the UTF-8 bytes of the text (0..255, exactly
    `list(s.encode("utf-8"))`, with no case folding or normalization), plus
    two special tokens: `start_token` `"<s>"` (id 256) and `end_token`
    `"</s>"` (id 257). `vocabulary_size()` is 258. `pad_token_id` is 0,
    which is also the byte `"\\x00"`: padding is told apart by a padding
    mask, not by its id.

    It is keras-hub's `ByteTokenizer` with these changes:

    - `tokenize` never lowercases or normalizes, and in a `tf.function` or
      `tf.data` pipeline it splits with core TensorFlow ops only
      (`DecodeRaw`, `ReduceJoin`, `StringLength`), so an exported graph
      loads in stock TensorFlow and TF Serving without TF Text.
    - `detokenize` drops the special tokens and keeps byte 0 (the base drops
      every 0, taking it for padding). Invalid UTF-8 becomes U+FFFD.
    - Special tokens are declared as keras-hub declares them, so
      `special_token_ids` is `[256, 257]` and a `CausalLMPreprocessor`
      strips them in `generate_postprocess`.

    With `byte_offset=2` the ids follow tensor2tensor's byte encoder, the
    layout of the pretrained `google/reformer-enwik8`: `pad_token` `"<pad>"`
    is id 0, `end_token` `"</s>"` id 1 and byte `b` is id `b + 2`; there is
    no start token (`start_token_id` is None). `vocabulary_size()` is 258
    too. `ReformerCausalLM.from_transformers` gives such a checkpoint this
    tokenizer.

    Eager calls run keras-hub's pure Python path (python lists for ragged
    output, backend tensors for dense output); inside `tf.function` and
    `tf.data` the TensorFlow path runs. Both give the same ids.

    Args:
        sequence_length: int or None. If set, outputs are dense, cut or
            padded with 0 to this length.
        byte_offset: 0 (default: bytes are ids 0..255, then `"<s>"` and
            `"</s>"`) or 2 (`"<pad>"`, `"</s>"`, then the bytes).
        dtype: integer dtype of the token ids. Defaults to `"int32"`.

    Example:

    >>> tokenizer = ReformerTokenizer()
    >>> tokenizer("héllo")
    array([104, 195, 169, 108, 108, 111], dtype=int32)
    >>> tokenizer.detokenize([256, 104, 105, 257])
    'hi'
    >>> tokenizer.vocabulary_size(), sorted(tokenizer.special_token_ids)
    (258, [256, 257])
    >>> ReformerTokenizer(byte_offset=2)("hi")
    array([106, 107], dtype=int32)
    """

    # keras-hub's preset loader picks a tokenizer for a backbone by this.
    backbone_cls = ReformerBackbone

    def __init__(self, sequence_length=None, byte_offset=0, dtype="int32", **kwargs):
        for name in _FIXED:
            if name in kwargs and kwargs[name] != _FIXED[name]:
                raise ValueError(
                    f"`ReformerTokenizer` fixes `{name}` to {_FIXED[name]!r} "
                    "(token ids are the exact UTF-8 bytes). Received: "
                    f"{name}={kwargs[name]!r}"
                )
            kwargs.pop(name, None)
        sequence_length = _checks.positive_int(
            "sequence_length", sequence_length, allow_none=True
        )
        _checks.one_of("byte_offset", byte_offset, tuple(_SPECIAL_TOKENS))
        self.byte_offset = byte_offset
        # Set before the special tokens: `token_to_id` reads them.
        self._special_ids = {token: id for _, token, id in _SPECIAL_TOKENS[byte_offset]}
        self.start_token = self.start_token_id = None
        for attribute, token, _ in _SPECIAL_TOKENS[byte_offset]:
            self._add_special_token(token, attribute)
        if byte_offset == 0:
            self.pad_token_id = PAD_TOKEN_ID
        super().__init__(
            sequence_length=sequence_length, dtype=dtype, **_FIXED, **kwargs
        )
        # No weights to build. Built, so that `model.quantize` (which first
        # checks that every layer of the model is built) passes over it.
        self.built = True

    # ------------------------------------------------------- vocabulary

    def vocabulary_size(self):
        """256 bytes and the two special tokens: 258."""
        return byte_tokenizer.VOCABULARY_SIZE + len(self._special_ids)

    def get_vocabulary(self):
        """A dict from token to id: the special tokens, and each byte as
        `ByteTokenizer.get_vocabulary` names it (a one-character string)."""
        vocabulary = {
            chr(i): i + self.byte_offset for i in range(byte_tokenizer.VOCABULARY_SIZE)
        }
        vocabulary.update(self._special_ids)
        return vocabulary

    def id_to_token(self, id):
        for token, special_id in self._special_ids.items():
            if id == special_id:
                return token
        if not isinstance(id, (int, np.integer)) or not (
            0 <= id - self.byte_offset < byte_tokenizer.VOCABULARY_SIZE
        ):
            raise ValueError(
                f"`id` must be an int in [0, {self.vocabulary_size() - 1}]. "
                f"Received: id={id!r}"
            )
        return chr(id - self.byte_offset)

    def token_to_id(self, token):
        if token in self._special_ids:
            return self._special_ids[token]
        if not isinstance(token, str) or len(token) != 1 or ord(token) > 255:
            raise ValueError(
                "A token is one character with code point < 256 (a byte) or "
                f"one of {sorted(self._special_ids)}. Received: token={token!r}"
            )
        return ord(token) + self.byte_offset

    # ------------------------------------------------- tokenize / detokenize

    def tokenize(self, inputs):
        check_strings("inputs", inputs)
        return super().tokenize(inputs)

    def _tokenize_python(self, inputs):
        if not self.byte_offset:
            return super()._tokenize_python(inputs)
        # The base pads with 0 before an offset could be added: shift
        # unpadded ids, then pad.
        length, self.sequence_length = self.sequence_length, None
        try:
            tokens = super()._tokenize_python(inputs)
        finally:
            self.sequence_length = length
        return _shifted(tokens, self.byte_offset, length, self.compute_dtype)

    @keras_hub_tensor_utils.preprocessing_function
    def _tokenize_tf(self, inputs):
        # Replaces the base's `tf.strings.bytes_split` (one string per byte)
        # with the core-op split of `keras_reformer.text`.
        tokens = byte_tokenizer.tokenize(inputs) + self.byte_offset
        tokens = tf.cast(tokens, self.compute_dtype)
        if self.sequence_length:
            if isinstance(tokens, tf.RaggedTensor):
                shape = tokens.shape.as_list()
                shape[-1] = self.sequence_length
                tokens = tokens.to_tensor(shape=shape)
            else:
                tokens = tokens[: self.sequence_length]
                tokens = tf.pad(
                    tokens, [[0, self.sequence_length - tf.shape(tokens)[0]]]
                )
                tokens = tf.ensure_shape(tokens, [self.sequence_length])
        return tokens

    @keras_hub_tensor_utils.preprocessing_function
    def _detokenize_tf(self, inputs):
        ids = inputs
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
        unbatched = ids.shape.rank == 1
        if unbatched:
            ids = ids[None]
        if isinstance(ids, tf.Tensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        keep = tf.ones_like(ids, dtype=tf.bool)
        for special_id in self._special_ids.values():
            keep = keep & (ids != special_id)
        ids = tf.ragged.boolean_mask(ids, keep) - self.byte_offset
        strings = byte_tokenizer.detokenize(ids)
        return strings[0] if unbatched else strings

    def _detokenize_python(self, inputs):
        # The base drops every 0 and decodes; here the special tokens are
        # dropped instead (0 is a byte in the default layout).
        rows, batched = keras_hub_tensor_utils.canonicalize_python_token_inputs(
            inputs
        )
        specials = set(self._special_ids.values())
        outputs = []
        for row in rows:
            row = [i - self.byte_offset for i in row if i not in specials]
            bad = [i + self.byte_offset for i in row
                   if not 0 <= i < byte_tokenizer.VOCABULARY_SIZE]
            if bad:
                raise ValueError(
                    f"Token ids must be bytes ({self.byte_offset}.."
                    f"{self.byte_offset + 255}) or the special tokens "
                    f"{sorted(specials)}. Received: {bad[:10]}"
                )
            outputs.append(bytes(row).decode("utf-8", errors="replace"))
        return outputs if batched else outputs[0]

    def get_config(self):
        config = super().get_config()
        for name in _FIXED:
            config.pop(name, None)
        config["byte_offset"] = self.byte_offset
        return config

    # -------------------------------------------------------------- presets

    # Bytes need no vocabulary file: nothing to save or load.
    def save_assets(self, dir_path):
        pass

    def load_preset_assets(self, preset):
        pass

    @classmethod
    def from_preset(
        cls, preset, config_file=keras_hub_presets.TOKENIZER_CONFIG_FILE,
        **kwargs,
    ):
        """Loads a tokenizer from a keras-hub preset.

        A full preset (with the backbone's `config.json`) loads the keras-hub
        way. A local directory written by `tokenizer.save_to_preset` alone
        (no backbone) loads from its tokenizer config.
        """
        if local_without_backbone(preset, config_file):
            loader = keras_hub_presets.KerasPresetLoader(preset, config=None)
            return loader.load_tokenizer(cls, config_file, **kwargs)
        return super().from_preset(preset, config_file=config_file, **kwargs)


def _shifted(tokens, offset, length, dtype):
    """keras-hub's unpadded python token output (an array for one string,
    nested lists for a batch), each id plus `offset`, then cut or padded
    with 0 to `length` if set; returned in the same form as the base's."""
    unbatched = isinstance(tokens, np.ndarray)

    def shift(value):
        if value and isinstance(value[0], list):
            return [shift(v) for v in value]
        ids = [int(i) + offset for i in value]
        return (ids + [0] * length)[:length] if length else ids

    out = shift(tokens.tolist() if unbatched else tokens)
    return np.array(out, dtype=dtype) if unbatched or length else out


def local_without_backbone(preset, config_file):
    """Whether `preset` is a local directory that a layer's
    `save_to_preset` wrote without a backbone: keras-hub's loaders need the
    backbone's `config.json` to pick a class, so such a directory is read
    from `config_file` directly."""
    if not (isinstance(preset, str) and os.path.isdir(preset)):
        return False
    backbone_config = keras_hub_presets.CONFIG_FILE
    if os.path.exists(os.path.join(preset, backbone_config)):
        return False
    if not os.path.exists(os.path.join(preset, config_file)):
        raise ValueError(
            f"Preset directory {preset!r} has neither {backbone_config} nor "
            f"{config_file}. Received: preset={preset!r}"
        )
    return True
