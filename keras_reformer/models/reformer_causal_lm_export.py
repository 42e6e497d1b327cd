"""Generation signatures of a `ReformerCausalLM` SavedModel (see `kr.export`).

Each signature is the same cached decode loop as `ReformerCausalLM.generate`
(`CachedDecoder.generate`), traced once with dynamic batch, prompt length
and `max_length`. It runs as a TensorFlow graph, not XLA: XLA would compile
anew for every request shape, and a graph loop that writes its caches in
place costs the same per token at any prompt length. Every op is a core
TensorFlow op (the text signatures tokenize with `DecodeRaw`, not TF Text),
so stock TensorFlow, `saved_model_cli` and TF Serving run them.

Bad requests fail with INVALID_ARGUMENT (graph-mode assertions, which do
fire outside XLA): mismatched shapes, inputs of another dtype or rank, an
empty batch, padding that is not right padding, an empty prompt, ids outside `[0, vocabulary_size)`, `max_length` outside
`[1, max_sequence_length]` or below a prompt's length.
"""

import keras_hub
import tensorflow as tf

from keras_reformer.export import checked_ids, checked_text
from keras_reformer.text import byte_tokenizer

IDS = tf.TensorSpec([None, None], tf.int32, name="token_ids")
MASK = tf.TensorSpec([None, None], tf.int32, name="padding_mask")
MAX_LENGTH = tf.TensorSpec([], tf.int32, name="max_length")
SEED = tf.TensorSpec([], tf.int32, name="seed")
TEXT = tf.TensorSpec([None], tf.string, name="text")


def _checked(lm, token_ids, padding_mask, max_length):
    """The request's checks; returns (ids, mask) cut to max_length columns."""
    limit = lm.backbone.max_sequence_length
    vocab = lm.backbone.vocabulary_size
    token_ids, padding_mask = checked_ids(token_ids, padding_mask)
    mask = tf.cast(padding_mask, tf.bool)
    checks = [
        tf.debugging.assert_greater_equal(
            max_length, 1, message="max_length must be >= 1"),
        tf.debugging.assert_less_equal(
            max_length, limit,
            message=f"max_length must be <= max_sequence_length={limit}"),
    ]
    with tf.control_dependencies(checks):
        lengths = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
        right_padded = tf.equal(
            mask, tf.range(tf.shape(mask)[1])[None, :] < lengths[:, None])
        real = tf.boolean_mask(token_ids, mask)
        checks = [
            tf.debugging.assert_positive(
                lengths, message="every prompt needs at least one real token"),
            tf.debugging.assert_equal(
                tf.reduce_all(right_padded), True,
                message="padding_mask must be right padding (ones, then zeros)"),
            tf.debugging.assert_non_negative(real, message="token ids must be >= 0"),
            tf.debugging.assert_less(
                real, vocab, message=f"token ids must be < vocabulary_size={vocab}"),
            tf.debugging.assert_less_equal(
                lengths, max_length, message="a prompt is longer than max_length"),
        ]
    with tf.control_dependencies(checks):
        # Padding columns beyond max_length carry nothing: drop them.
        return (tf.identity(token_ids[:, :max_length]),
                tf.identity(padding_mask[:, :max_length]))


def _generate(lm, token_ids, padding_mask, max_length, sampler, seed):
    """The decode loop on checked inputs -> {"token_ids", "padding_mask"} int32."""
    token_ids, padding_mask = _checked(lm, token_ids, padding_mask, max_length)
    stop = (lm.preprocessor.end_token_id,) if lm.preprocessor is not None else ()
    ids, mask = lm._decoder().generate(
        token_ids, padding_mask, tf.stack([seed, 0]), max_length=max_length,
        sampler=sampler, stop_token_ids=stop, in_place=True,
    )
    return {"token_ids": ids, "padding_mask": tf.cast(mask, tf.int32)}


def _pack_text(lm, text, max_length):
    """Strings -> prompt ids as `generate_preprocess(text, max_length)` packs
    them (start token, bytes cut to fit), but only as wide as the longest."""
    pre = lm.preprocessor
    ragged = byte_tokenizer.tokenize(checked_text(text)) + pre.tokenizer.byte_offset
    room = max_length - int(pre.add_start_token)
    ragged = ragged[:, : tf.maximum(room, 0)]
    if pre.add_start_token:
        start = tf.fill([ragged.nrows(), 1], pre.start_token_id)
        ragged = tf.concat([tf.cast(start, ragged.dtype), ragged], axis=1)
    return ragged.to_tensor(0), tf.ones_like(ragged).to_tensor(0)


def _unpack_text(lm, out):
    """Generated ids -> strings, as `generate_postprocess` gives them
    (padding and special tokens dropped, bytes decoded), in core TF ops."""
    pre = lm.preprocessor
    ids = out["token_ids"]
    keep = tf.cast(out["padding_mask"], tf.bool)
    for special in pre.tokenizer.special_token_ids:
        keep = keep & (ids != special)
    ids = tf.ragged.boolean_mask(ids, keep) - pre.tokenizer.byte_offset
    return byte_tokenizer.detokenize(ids)


def _one_token_sampler(sampler):
    """A keras-hub sampler (or name) that picks one token per step from the
    logits, which the served loop can draw statelessly."""
    name = sampler
    sampler = keras_hub.samplers.get(sampler)
    if not isinstance(sampler, keras_hub.samplers.Sampler):
        raise ValueError(
            f"Unknown sampler name {name!r}: `sampler` must be a "
            "keras_hub.samplers.Sampler or the name of one ('greedy', "
            "'random', 'top_k', 'top_p')."
        )
    if isinstance(sampler, (keras_hub.samplers.BeamSampler,
                            keras_hub.samplers.ContrastiveSampler)):
        raise ValueError(
            f"`sampler` {type(sampler).__name__} runs a search loop of its own; "
            "the served signatures draw one token per step: use 'greedy', "
            "'random', 'top_k' or 'top_p'."
        )
    return sampler


def add_generate_endpoints(archive, lm, text=False, sampler=None):
    """Adds `generate` (and `generate_sampled`, `generate_text`,
    `generate_text_sampled`) to a `keras.export.ExportArchive` tracking `lm`.

    Args:
        archive: the `ExportArchive`.
        lm: a `ReformerCausalLM`.
        text: add the string signatures (needs `lm.preprocessor`).
        sampler: None, or a keras-hub sampler (or name) for the `*_sampled`
            signatures, which take a `seed` (the sampler draws from it,
            statelessly); `generate` and `generate_text` are greedy.
    """
    greedy = keras_hub.samplers.GreedySampler()
    zero = tf.constant(0)

    def generate(token_ids, padding_mask, max_length):
        return _generate(lm, token_ids, padding_mask, max_length, greedy, zero)

    archive.add_endpoint("generate", generate,
                         input_signature=[IDS, MASK, MAX_LENGTH])
    if sampler is not None:
        sampler = _one_token_sampler(sampler)

        def generate_sampled(token_ids, padding_mask, max_length, seed):
            return _generate(lm, token_ids, padding_mask, max_length, sampler, seed)

        archive.add_endpoint("generate_sampled", generate_sampled,
                             input_signature=[IDS, MASK, MAX_LENGTH, SEED])
    if not text:
        return

    def to_text(text, max_length, sampler, seed):
        ids, mask = _pack_text(lm, text, max_length)
        out = _generate(lm, ids, mask, max_length, sampler, seed)
        return {"text": _unpack_text(lm, out)}

    def generate_text(text, max_length):
        return to_text(text, max_length, greedy, zero)

    archive.add_endpoint("generate_text", generate_text,
                         input_signature=[TEXT, MAX_LENGTH])
    if sampler is not None:
        def generate_text_sampled(text, max_length, seed):
            return to_text(text, max_length, sampler, seed)

        archive.add_endpoint("generate_text_sampled", generate_text_sampled,
                             input_signature=[TEXT, MAX_LENGTH, SEED])
