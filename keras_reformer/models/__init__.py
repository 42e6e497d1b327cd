"""The Reformer model family, on keras-hub's base classes.

`ReformerBackbone` (also `ReformerModel`), `ReformerCausalLM`,
`ReformerCausalLMPreprocessor` and `ReformerTokenizer`. keras-hub is
imported on first use of one of them, so `import keras_reformer` and users
of `keras_reformer.layers` alone do not load it.
"""

import importlib

_HOMES = {
    "ReformerBackbone": "reformer_backbone",
    "ReformerModel": "reformer_backbone",
    "ReformerCausalLM": "reformer_causal_lm",
    "ReformerCausalLMPreprocessor": "reformer_causal_lm_preprocessor",
    "ReformerTokenizer": "reformer_tokenizer",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    if name == "ReformerModel":
        return module.ReformerBackbone
    return getattr(module, name)


def __dir__():
    return sorted(list(globals()) + __all__)
