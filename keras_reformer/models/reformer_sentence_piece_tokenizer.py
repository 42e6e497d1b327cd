"""ReformerSentencePieceTokenizer: a SentencePiece model's ids, on keras-hub's
`SentencePieceTokenizer`."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_reformer import _checks
from keras_reformer.models.reformer_backbone import ReformerBackbone


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerSentencePieceTokenizer(SentencePieceTokenizer):
    """The tokenizer of a Reformer trained on SentencePiece ids, such as the
    pretrained `google/reformer-crime-and-punishment`.

    keras-hub's `SentencePieceTokenizer` (TF Text's SentencePiece op inside
    `tf.function` and `tf.data`, the `sentencepiece` package eagerly), with
    the special tokens of HF transformers' `ReformerTokenizer`: an end token
    (`"</s>"`) and no start token (`start_token_id` is None), so a
    `ReformerCausalLMPreprocessor` takes it with `add_start_token=False`.
    Text that spells a special token (`"</s>"`) is tokenized as the
    SentencePiece model splits it, not as the special token.

    `pad_token_id` is a plain id (0 unless the model has a `"<pad>"`
    piece); padding is told apart by the padding mask, as everywhere in the
    library.

    TF Serving does not link TF Text's op, so a model exported with this
    tokenizer takes token ids (see docs/serving.md).

    Args:
        proto: the SentencePiece model: a file path (such as a checkpoint's
            `spiece.model`) or its serialized bytes.
        sequence_length: int or None. If set, outputs are dense, cut or
            padded with `pad_token_id` to this length.
        end_token: the end-of-sequence piece. Defaults to `"</s>"`.
        dtype: the output dtype. Defaults to `"int32"`.

    Example:

    >>> tokenizer = ReformerSentencePieceTokenizer("ckpt/spiece.model")
    >>> ids = tokenizer(["A few months later"])
    >>> tokenizer.detokenize(ids)
    """

    backbone_cls = ReformerBackbone

    def __init__(self, proto=None, sequence_length=None, end_token="</s>",
                 dtype="int32", **kwargs):
        _checks.instance("end_token", end_token, str, "a string (a piece of the model)")
        sequence_length = _checks.positive_int(
            "sequence_length", sequence_length, allow_none=True
        )
        self.start_token = self.start_token_id = None
        self._add_special_token(end_token, "end_token")
        super().__init__(proto=proto, sequence_length=sequence_length,
                         dtype=dtype, **kwargs)
        # No weights to build (see ReformerTokenizer).
        self.built = True

    def set_proto(self, proto):
        super().set_proto(proto)
        # Until a vocabulary is loaded (a preset loads it after building
        # the tokenizer) 0 stands in.
        self.pad_token_id = (
            0 if self.proto is None else self._token_to_id_map.get("<pad>", 0)
        )

    def get_config(self):
        config = super().get_config()
        config["end_token"] = self.end_token
        return config
