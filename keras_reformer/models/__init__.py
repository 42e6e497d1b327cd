"""The Reformer model family, on keras-hub's base classes.

`ReformerBackbone` (also `ReformerModel`), `ReformerCausalLM`,
`ReformerCausalLMPreprocessor`, `ReformerTokenizer` and
`ReformerSentencePieceTokenizer`. Importing this
package loads keras-hub (and registers the classes, so saved models and
presets find them); `import keras_reformer` alone does not: the package
`keras_reformer.models` is imported on first use of `keras_reformer.models`.
"""

from keras_reformer.models.reformer_backbone import ReformerBackbone, ReformerModel  # noqa: F401
from keras_reformer.models.reformer_causal_lm import ReformerCausalLM  # noqa: F401
from keras_reformer.models.reformer_causal_lm_preprocessor import (  # noqa: F401
    ReformerCausalLMPreprocessor,
)
from keras_reformer.models.reformer_sentence_piece_tokenizer import (  # noqa: F401
    ReformerSentencePieceTokenizer,
)
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer  # noqa: F401
