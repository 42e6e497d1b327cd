"""keras-reformer: the Reformer (Kitaev et al., 2020) as Keras 3 layers.

Public API: `keras_reformer.layers`, `keras_reformer.models` (the keras-hub
model family: imported on first use, since it loads keras-hub),
`keras_reformer.export`, `keras_reformer.data`, `keras_reformer.distribute`,
`keras_reformer.memory`.
Before loading a saved Reformer model or preset, `import keras_reformer.models`
(it registers the model classes).
"""

import importlib

from keras_reformer import _compat  # noqa: F401  (fails clearly on a non-TF backend)
from keras_reformer import data  # noqa: F401
from keras_reformer import distribute  # noqa: F401
from keras_reformer import export  # noqa: F401
from keras_reformer import layers  # noqa: F401
from keras_reformer import memory  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # keras-hub costs ~150 MB of memory to import: only model users pay it.
    if name == "models":
        return importlib.import_module("keras_reformer.models")
    raise AttributeError(f"module 'keras_reformer' has no attribute {name!r}")
