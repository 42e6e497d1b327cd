"""Models of keras-reformer."""

from keras_reformer.models.reformer_model import ReformerModel  # noqa: F401
