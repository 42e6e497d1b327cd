"""Public layers of keras-reformer."""

from keras_reformer.layers.lsh_attention import LSHAttention  # noqa: F401
