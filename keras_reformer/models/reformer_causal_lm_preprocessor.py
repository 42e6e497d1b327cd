"""ReformerCausalLMPreprocessor: strings -> byte ids for a causal LM, in tf.data."""

import keras
import tensorflow as tf

from keras_reformer.text import byte_tokenizer

START_TOKEN_ID = byte_tokenizer.VOCABULARY_SIZE  # 256
END_TOKEN_ID = byte_tokenizer.VOCABULARY_SIZE + 1  # 257
PAD_TOKEN_ID = 0  # padding is told apart by `padding_mask`, not by its id


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReformerCausalLMPreprocessor(keras.layers.Layer):
    """Byte-level preprocessing for `ReformerCausalLM` (keras-hub's
    `CausalLMPreprocessor` shape).

    Token ids are the UTF-8 bytes of the text (0..255), plus a start token
    (256) and an end token (257): a backbone needs `vocabulary_size >= 258`
    (`preprocessor.vocabulary_size`). Only core TensorFlow ops are used
    (`DecodeRaw`, `ReduceJoin`, `StringLength`, ragged tensors), so it runs in
    `tf.data` and anything exported with it loads in stock TensorFlow and TF
    Serving.

    Called on strings (a batch, or one string per element in an unbatched
    `tf.data` pipeline) it packs `[start] + bytes + [end]` into
    `sequence_length + 1` ids and returns keras-hub's training triple:
    `x = {"token_ids", "padding_mask"}` (the first `sequence_length` ids),
    `y` (the next ids) and `sample_weight` (the padding mask of `y`, float32). Padding masks are
    int32 (the backbone's input dtype).
    `generate_preprocess` packs prompts (start token, no end token) and
    `generate_postprocess` turns generated ids back into strings.

    Args:
        sequence_length: int, the packed length of training examples.
        add_start_token: bool, prepend the start token.
        add_end_token: bool, append the end token (when it fits).

    Example:

    >>> pre = ReformerCausalLMPreprocessor(sequence_length=8)
    >>> x, y, w = pre(["abc"])
    >>> x["token_ids"].numpy()
    array([[256,  97,  98,  99, 257,   0,   0,   0]], dtype=int32)
    """

    def __init__(self, sequence_length=1024, add_start_token=True,
                 add_end_token=True, **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = _positive("sequence_length", sequence_length)
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)
        self.start_token_id = START_TOKEN_ID
        self.end_token_id = END_TOKEN_ID
        self.pad_token_id = PAD_TOKEN_ID
        self.built = True

    @property
    def vocabulary_size(self):
        """Ids this preprocessor may emit: 256 bytes + start + end."""
        return byte_tokenizer.VOCABULARY_SIZE + 2

    def __call__(self, x, *args, **kwargs):
        # Keras only accepts tensors as positional arguments; take python
        # strings and lists of them as well.
        if not isinstance(x, (tf.Tensor, tf.RaggedTensor)):
            x = tf.convert_to_tensor(x)
        return super().__call__(x, *args, **kwargs)

    # ----------------------------------------------------------- packing

    def _tokenize(self, strings):
        """Strings (scalar or (B,)) -> (ragged (B, None) int32, was_scalar)."""
        strings = tf.convert_to_tensor(strings)
        if strings.dtype != tf.string:
            raise ValueError(
                "ReformerCausalLMPreprocessor takes strings. Received a tensor "
                f"of dtype {strings.dtype.name}; pass token ids to the model "
                "directly instead."
            )
        scalar = strings.shape.rank == 0
        if scalar:
            strings = strings[None]
        elif strings.shape.rank != 1:
            raise ValueError(
                "Expected a string or a 1-D batch of strings. Received shape "
                f"{tuple(strings.shape)}"
            )
        return byte_tokenizer.tokenize(strings), scalar

    def _pack(self, ragged, length, add_start, add_end):
        """Ragged ids -> dense (B, length) ids and bool mask, right-padded.

        The content is cut first, so that the special tokens always fit
        (as keras-hub's StartEndPacker does).
        """
        room = length - int(add_start) - int(add_end)
        if room < 0:
            raise ValueError(
                f"`sequence_length` {length} leaves no room for the special "
                "tokens."
            )
        ragged = ragged[:, :room]
        rows = ragged.nrows()
        parts = []
        if add_start:
            parts.append(tf.fill([rows, 1], self.start_token_id))
        parts.append(ragged)
        if add_end:
            parts.append(tf.fill([rows, 1], self.end_token_id))
        packed = tf.concat(parts, axis=1) if len(parts) > 1 else ragged
        ids = packed.to_tensor(default_value=self.pad_token_id, shape=[None, length])
        mask = tf.ones_like(packed, tf.bool).to_tensor(
            default_value=False, shape=[None, length]
        )
        return ids, mask

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "ReformerCausalLMPreprocessor makes the labels itself (the "
                "next bytes); pass only strings. Received y or sample_weight."
            )
        length = sequence_length or self.sequence_length
        ragged, scalar = self._tokenize(x)
        ids, mask = self._pack(ragged, length + 1, self.add_start_token,
                               self.add_end_token)
        # int32 padding mask: the dtype of the backbone's input.
        x = {"token_ids": ids[:, :-1],
             "padding_mask": tf.cast(mask[:, :-1], tf.int32)}
        y, sample_weight = ids[:, 1:], tf.cast(mask[:, 1:], tf.float32)
        if scalar:
            x = {k: v[0] for k, v in x.items()}
            y, sample_weight = y[0], sample_weight[0]
        return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts -> {"token_ids", "padding_mask"} (B, sequence_length),
        with the start token and without the end token."""
        length = sequence_length or self.sequence_length
        ragged, scalar = self._tokenize(x)
        ids, mask = self._pack(ragged, length, self.add_start_token, False)
        out = {"token_ids": ids, "padding_mask": tf.cast(mask, tf.int32)}
        return {k: v[0] for k, v in out.items()} if scalar else out

    def generate_postprocess(self, x):
        """{"token_ids", "padding_mask"} -> strings: padding and special
        tokens dropped, bytes decoded (invalid UTF-8 replaced)."""
        ids = tf.convert_to_tensor(x["token_ids"], tf.int32)
        mask = tf.cast(x["padding_mask"], tf.bool)
        scalar = ids.shape.rank == 1
        if scalar:
            ids, mask = ids[None], mask[None]
        keep = mask & (ids != self.start_token_id) & (ids != self.end_token_id)
        ragged = tf.ragged.boolean_mask(ids, keep)
        strings = byte_tokenizer.detokenize(ragged)
        return strings[0] if scalar else strings

    def get_config(self):
        config = super().get_config()
        config.update(
            sequence_length=self.sequence_length,
            add_start_token=self.add_start_token,
            add_end_token=self.add_end_token,
        )
        return config
