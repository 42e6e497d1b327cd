"""SavedModel export for TensorFlow Serving.

`export_saved_model(model, "models/reformer")` writes `models/reformer/1/`,
a SavedModel with the `serve` tag and these signatures:

- `serving_default`: `token_ids` int32 `[batch, length]` -> `logits`
  `[batch, length, vocabulary]` (every position is a real token);
- `with_padding_mask`: `token_ids` and `padding_mask` int32 `[batch, length]`
  (1 = token, 0 = padding) -> `logits`. Keras masks do not survive export, so
  padding is an explicit input (a signature cannot have optional inputs,
  hence two signatures);
- with `text_signature=True`, `next_token`: `text` string `[batch]`,
  tokenized in the graph into its UTF-8 bytes -> `log_probs`
  `[batch, vocabulary]` of the token after each text. Needs a byte-level
  model (vocabulary 256).

A `ReformerCausalLM` also gets generation signatures, the cached decode loop
of `ReformerCausalLM.generate` (greedy):

- `generate`: `token_ids`, `padding_mask` int32 `[batch, length]` (right
  padding) and `max_length` int32 scalar -> `token_ids`, `padding_mask`
  int32 `[batch, max_length]`;
- with `text_signature=True` (needs its preprocessor), `generate_text`:
  `text` string `[batch]`, `max_length` -> `text` string `[batch]`;
- with `sampler=`, also `generate_sampled` and `generate_text_sampled`,
  which take a `seed` int32 scalar as well.

Every signature uses core TensorFlow ops only (the text one tokenizes with
`DecodeRaw`, not TF Text), so any TensorFlow runtime loads the SavedModel:
`tf.saved_model.load`, `saved_model_cli run`, TF Serving.

Batch and length are dynamic. Inference is deterministic (LSH rotations come
from each layer's seed). Bad requests fail with INVALID_ARGUMENT: token ids
outside `[0, vocabulary_size)`, lengths above the position embedding's
maximum, a padding mask of another shape, inputs of another dtype or rank,
an empty batch or a length of 0.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer.text import byte_tokenizer


def checked_ids(token_ids, padding_mask):
    """`token_ids`, `padding_mask` after the checks every token-id signature
    makes first: rank 2, the same shape, at least one row and one column.

    A signature's input spec does not check the rank of what is fed (neither
    `ConcreteFunction` calls nor a server's session run do), so a rank-1 or
    rank-3 request would otherwise fail deep inside the model with a message
    naming an internal op, and an empty batch would be answered with an
    empty result. `EnsureShape` checks at run time (the static rank is 2 by
    the spec, so `assert_rank` would be a no-op). Everything downstream
    depends on the checks, so they fail first, as INVALID_ARGUMENT.
    """
    token_ids = tf.ensure_shape(token_ids, [None, None], name="token_ids_must_be_2d")
    padding_mask = tf.ensure_shape(padding_mask, [None, None],
                                   name="padding_mask_must_be_2d")
    checks = [
        tf.debugging.assert_equal(
            tf.shape(token_ids), tf.shape(padding_mask),
            message="padding_mask must have the shape of token_ids"),
        tf.debugging.assert_positive(
            tf.shape(token_ids),
            message="token_ids must have at least one row and one column "
                    "(empty batch or length 0)"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(token_ids), tf.identity(padding_mask)


def checked_text(text):
    """`text` checked to be a batch of strings (rank 1), with at least one."""
    text = tf.ensure_shape(text, [None], name="text_must_be_1d")
    check = tf.debugging.assert_positive(
        tf.size(text), message="text must hold at least one string (empty batch)")
    with tf.control_dependencies([check]):
        return tf.identity(text)


def _length_limit(model):
    """The model's longest input, if it says (a Reformer backbone, or a
    task model on one); None otherwise."""
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "max_sequence_length", None)


def _bucket_length(length, limit):
    """The next power of two >= `length` (int32 scalar), at most `limit`
    but never below `length` (a longer request still fails the model's own
    length check). Integer bit smearing: no float log, exact at powers."""
    v = length - 1
    for shift in (1, 2, 4, 8, 16):
        v = tf.bitwise.bitwise_or(v, tf.bitwise.right_shift(v, shift))
    return tf.maximum(tf.minimum(v + 1, limit), length)


def _logits(model, token_ids, padding_mask):
    token_ids, padding_mask = checked_ids(token_ids, padding_mask)
    length = tf.shape(token_ids)[1]
    limit = _length_limit(model)
    # With the reference's rules (an imported checkpoint) padding moves the
    # chunk windows of real positions: those requests run at their length.
    reference = getattr(getattr(model, "backbone", model), "reference_rules", False)
    if limit is not None and not reference:
        # Served requests come in every length, and TF's CPU kernels (oneDNN)
        # keep a primitive per distinct input shape: a server's memory grows
        # with each new length until that cache is full (measured with
        # benchmarks/serve_load.py, docs/serving.md). Padded on the right to
        # the next power of two, requests of 1 to 4,096 tokens take 13
        # lengths, at most twice the work; real positions never see the
        # padding (masked, and after them), and the logits are cut back.
        pad = _bucket_length(length, limit) - length
        token_ids = tf.pad(token_ids, [[0, 0], [0, pad]])
        padding_mask = tf.pad(padding_mask, [[0, 0], [0, pad]])
    out = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
    out = out[:, :length]
    return tf.cast(out, tf.float32)


def export_saved_model(model, export_dir, version=1, text_signature=False,
                       overwrite=False, sampler=None):
    """Write `model` as `export_dir/<version>/` for TF Serving.

    Args:
        model: a `ReformerCausalLM`, or any Keras model taking the dict
            inputs `token_ids`/`padding_mask` (e.g. a `ReformerBackbone`,
            whose output is its hidden states). A `ReformerCausalLM` also
            gets the `generate` signatures, unless its backbone follows the
            reference's rules (`reference_rules=True`, an imported
            checkpoint): its outputs are not prefix-stable, so no cached
            decoding exists for it, and it is exported with the logits
            signatures only (generate by calling `with_padding_mask` on the
            text so far, one token at a time).
        export_dir: the model base path TF Serving is pointed at.
        version: positive int, the version folder.
        text_signature: add the string signatures: `next_token` for a
            model whose output is logits over bytes (256), `generate_text`
            for a `ReformerCausalLM` with a preprocessor.
        overwrite: replace an existing version folder.
        sampler: `ReformerCausalLM` only: a keras-hub sampler (or its
            name), drawn statelessly from the request's seed, for the
            extra signatures `generate_sampled` (and `generate_text_sampled`)
            that take a `seed`; None adds only the greedy ones.

    The SavedModel is written to a hidden staging folder in `export_dir` and
    renamed into place, so a model server watching `export_dir` never loads a
    half-written version.

    Returns:
        The path of the written version folder.
    """
    version = _checks.positive_int("version", version)
    # Imported here: the models load keras-hub, which exporting a plain
    # Keras model does not need.
    from keras_reformer.models.reformer_causal_lm import ReformerCausalLM
    from keras_reformer.models.reformer_causal_lm_export import add_generate_endpoints
    from keras_reformer.models.reformer_tokenizer import ReformerTokenizer

    lm = model if isinstance(model, ReformerCausalLM) else None
    if sampler is not None and lm is None:
        raise ValueError(
            "`sampler` is for the generation signatures of a ReformerCausalLM. "
            f"Received: model={type(model).__name__}, sampler={sampler!r}"
        )
    if lm is not None and text_signature and lm.preprocessor is None:
        raise ValueError(
            "`text_signature=True` with a ReformerCausalLM needs its "
            "preprocessor (strings to ids); this one has preprocessor=None."
        )
    # A tokenizer other than the byte one (SentencePiece) needs TF Text ops.
    text_ops = lm is not None and lm.preprocessor is not None and not isinstance(
        lm.preprocessor.tokenizer, ReformerTokenizer
    )
    if text_signature and text_ops:
        raise ValueError(
            "`text_signature=True` tokenizes in the graph with core TensorFlow "
            "ops, which only a `ReformerTokenizer` (bytes) does. Received a "
            f"{type(lm.preprocessor.tokenizer).__name__}: export the id "
            "signatures and tokenize before the request (TF Serving does not "
            "link TF Text's SentencePiece op)."
        )
    width = tuple(getattr(model, "output_shape", None) or (None,))[-1]
    if lm is None and text_signature and width != byte_tokenizer.VOCABULARY_SIZE:
        raise ValueError(
            "`text_signature=True` needs a ReformerCausalLM, or a model whose "
            "output is logits over bytes (last dimension "
            f"{byte_tokenizer.VOCABULARY_SIZE}). Received a model with output "
            f"width {width}."
        )
    export_dir = os.fspath(export_dir)
    path = os.path.join(export_dir, str(version))
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True or another `version`.")

    archive = keras.export.ExportArchive()
    if text_ops:
        # Tracking the task would save its tokenizer's resources (TF Text's
        # SentencePiece op), which stock TensorFlow cannot load; the id
        # signatures use the backbone and the head only.
        archive.track(lm.backbone)
        archive.track(lm.lm_head)
    else:
        archive.track(model)
    ids_spec = tf.TensorSpec([None, None], tf.int32, name="token_ids")
    mask_spec = tf.TensorSpec([None, None], tf.int32, name="padding_mask")

    def serve(token_ids):
        return {"logits": _logits(model, token_ids, tf.ones_like(token_ids))}

    def serve_padded(token_ids, padding_mask):
        return {"logits": _logits(model, token_ids, padding_mask)}

    archive.add_endpoint("serving_default", serve, input_signature=[ids_spec])
    archive.add_endpoint(
        "with_padding_mask", serve_padded, input_signature=[ids_spec, mask_spec]
    )
    if lm is not None and lm.backbone.reference_rules:
        if sampler is not None or text_signature:
            raise ValueError(
                "A ReformerCausalLM with `reference_rules=True` exports the "
                "logits signatures only (no cached decoding exists for it). "
                f"Received: sampler={sampler!r}, text_signature={text_signature}"
            )
    elif lm is not None:
        add_generate_endpoints(archive, lm, text=text_signature, sampler=sampler)
    elif text_signature:
        def next_token(text):
            ragged = byte_tokenizer.tokenize(checked_text(text))
            check = tf.debugging.assert_positive(
                ragged.row_lengths(), message="every text needs at least one byte"
            )
            with tf.control_dependencies([check]):
                ids = ragged.to_tensor(0)
            mask = tf.ones_like(ragged).to_tensor(0)
            logits = _logits(model, ids, mask)
            last = tf.gather(logits, ragged.row_lengths() - 1, axis=1, batch_dims=1)
            return {"log_probs": tf.nn.log_softmax(last, axis=-1)}

        archive.add_endpoint(
            "next_token", next_token,
            input_signature=[tf.TensorSpec([None], tf.string, name="text")],
        )
    # Written beside the target under a non-numeric name, then renamed: TF
    # Serving polls the base path and must never see a half-written version.
    os.makedirs(export_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".staging-{version}-", dir=export_dir)
    try:
        # A served model is only ever called, never differentiated: leaving
        # out the gradient functions of the custom gradients (the reversible
        # stack, the attention's recomputing loops) saves a quarter of the
        # export's tracing time and their graphs in the SavedModel.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        archive.write_out(os.path.join(staging, "model"), options=options,
                          verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(os.path.join(staging, "model"), path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
