"""Structural changes (quantize, LoRA) of a model holding stacked reversible blocks."""

import contextlib

from keras_reformer.layers.reversible_sequence import ReversibleSequence

# Keras' calibrated modes run a model's blocks one after another on
# calibration data (`sequential_blocks`); a reversible stack's blocks are
# (f, g) pairs on two streams, which that machinery does not model.
CALIBRATED_MODES = ("gptq", "awq")


def _stacks(model):
    return [
        layer for layer in model._flatten_layers()
        if isinstance(layer, ReversibleSequence) and layer.stack_weights
    ]


@contextlib.contextmanager
def blocks_in_sync(model):
    """Around a change of the blocks' layers (keras' `quantize`, keras-hub's
    `enable_lora`), which reads and replaces the blocks' own variables:
    before it, the blocks take the stacked (trained) values; after it, every
    stack with `stack_weights=True` is made again from its blocks."""
    stacks = _stacks(model)
    for stack in stacks:
        stack.sync_blocks()
    yield
    for stack in stacks:
        stack.restack()
    model.train_function = model.test_function = model.predict_function = None


def check_quantization_mode(mode, config):
    """Refuses the calibrated modes (before any layer is changed)."""
    mode = mode if mode is not None else getattr(config, "mode", None)
    if mode in CALIBRATED_MODES:
        raise ValueError(
            f"quantize(mode={mode!r}) is not supported by Reformer models: "
            "Keras' calibrated quantization runs a model's blocks one after "
            "another, and a reversible stack's blocks are (f, g) pairs on two "
            "streams. Supported modes: 'int8', 'int4', 'float8'."
        )
