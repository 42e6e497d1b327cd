"""Byte-level tokenization with core TensorFlow ops: the same functions serve
tf.data pipelines and exported serving graphs (stock TensorFlow, TF Serving
and `saved_model_cli` load them; no TF Text ops)."""

from keras_reformer.text.byte_tokenizer import (  # noqa: F401
    VOCABULARY_SIZE,
    detokenize,
    tokenize,
)
