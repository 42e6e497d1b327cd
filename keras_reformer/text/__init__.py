"""Byte-level tokenization with tensorflow-text, usable in tf.data and in
serving graphs (TF Serving links the TF Text ops)."""

from keras_reformer.text.byte_tokenizer import (  # noqa: F401
    VOCABULARY_SIZE,
    detokenize,
    tokenize,
)
