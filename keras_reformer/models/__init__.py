"""Models of keras-reformer."""

from keras_reformer.models.reformer_model import ReformerModel  # noqa: F401
from keras_reformer.models.reformer_causal_lm import ReformerCausalLM  # noqa: F401
from keras_reformer.models.reformer_causal_lm_preprocessor import (  # noqa: F401
    ReformerCausalLMPreprocessor,
)
