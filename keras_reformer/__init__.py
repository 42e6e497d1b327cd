"""keras-reformer: the Reformer (Kitaev et al., 2020) as Keras 3 layers.

Public API: `keras_reformer.layers`, `keras_reformer.models` (keras-hub
models, loaded on first use), `keras_reformer.export`, `keras_reformer.data`,
`keras_reformer.distribute`.
"""

from keras_reformer import _compat  # noqa: F401  (fails clearly on a non-TF backend)
from keras_reformer import data  # noqa: F401
from keras_reformer import distribute  # noqa: F401
from keras_reformer import export  # noqa: F401
from keras_reformer import layers  # noqa: F401
from keras_reformer import models  # noqa: F401

__version__ = "0.1.0"
