"""Structural changes (quantize, LoRA) of a model holding stacked reversible blocks."""

import contextlib

from keras_reformer.layers.reversible_sequence import ReversibleSequence

# Keras' calibrated modes: they run the model stage by stage on calibration
# data (see `_calibration.py`).
CALIBRATED_MODES = ("gptq", "awq")


def _stacks(model):
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, ReversibleSequence) and layer.stacked
    ]


@contextlib.contextmanager
def blocks_in_sync(model):
    """Around a change of the blocks' layers (keras' `quantize`, keras-hub's
    `enable_lora`), which reads and replaces the blocks' own variables:
    before it, the blocks take the stacked (trained) values; after it, every
    stack whose weights are stacked is made again from its blocks."""
    stacks = _stacks(model)
    for stack in stacks:
        stack.sync_blocks()
    yield
    for stack in stacks:
        stack.restack()
    model.train_function = model.test_function = model.predict_function = None


def calibrated_mode(mode, config):
    """Whether `quantize(mode, config)` is one of Keras' calibrated modes."""
    mode = mode if mode is not None else getattr(config, "mode", None)
    return mode in CALIBRATED_MODES
