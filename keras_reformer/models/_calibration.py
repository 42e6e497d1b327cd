"""Keras' calibrated quantization ("gptq", "awq") on a Reformer backbone.

Keras calibrates a model stage by stage: it runs `pre_block_layers` on
token ids, then each of `sequential_blocks` on the previous stage's output,
hooking the `Dense`/`EinsumDense` layers inside the running stage to collect
their inputs, quantizing them, and feeding the quantized stage's output to
the next one. A reversible stack's blocks are (f, g) pairs on two streams,
so here a stage carries both streams, concatenated on the last axis (Keras
passes one tensor between stages): the embedding stage starts them as
[x, x], as the backbone does, and each pair stage applies
y1 = x1 + f(x2), y2 = x2 + g(y1). Calibration therefore sees exactly the
activations the backbone's forward pass gives each layer.

Keras 3.15 installs its calibration hooks on each layer's `call`, but
switches the layer to the calibrated mode first, after which
`Operation.__call__` dispatches to `quantized_call` and the hooks never run:
GPTQ then sees a zero Hessian and reduces to round-to-nearest, and AWQ
searches its scales blind (keras-team/keras#23512, fixed after 3.15.1).
While a hook is installed, a stage routes that dispatch through it, so that
calibration sees the activations (the hooks call the float kernel, as
Keras intends until a layer is calibrated).

Only the blocks' layers are quantized in these modes: the embedding and the
LM head are outside every stage, so Keras would give them the calibrated
mode's variables without ever calibrating them.
"""

import contextlib

import keras
import tensorflow as tf

from keras_reformer import _compat
from keras_reformer.models._stacks import CALIBRATED_MODES


def _all_positions(x):
    # Calibration samples are whole windows of text: no padding.
    return tf.ones(tf.shape(x)[:2], tf.bool)


class EmbeddingStage(keras.layers.Layer):
    """Token ids -> the two streams [x, x] (the backbone's layers before its
    reversible stack, in inference mode)."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        # A list, so that Keras does not track the backbone as a sublayer
        # of this transient stage.
        self._backbone = [backbone]

    def call(self, token_ids):
        backbone = self._backbone[0]
        token_ids = tf.convert_to_tensor(token_ids)
        if token_ids.shape.rank == 1:  # Keras feeds one sample at a time
            token_ids = token_ids[None]
        x = backbone.embed(token_ids, _all_positions(token_ids), training=False)
        return tf.concat([x, x], axis=-1)


@contextlib.contextmanager
def _hooks_reachable(stage):
    """See the module docstring: each layer of `stage` in a calibrated mode
    whose `call` is Keras' hook (a function set on the instance; once the
    hooks are removed, the instance holds its own bound `call` again) is
    called through that hook for the duration."""
    patched = [
        layer for layer in stage._flatten_layers(include_self=False)
        if getattr(layer, "quantization_mode", None) in CALIBRATED_MODES
        and callable(vars(layer).get("call"))
        and getattr(vars(layer)["call"], "__self__", None) is not layer
    ]
    for layer in patched:
        layer.quantized_call = layer.call
    try:
        yield
    finally:
        for layer in patched:
            del layer.quantized_call


class ReversiblePairStage(keras.layers.Layer):
    """One reversible block (f, g) on the concatenated streams."""

    def __init__(self, f, g, **kwargs):
        super().__init__(**kwargs)
        self.f = f
        self.g = g

    def call(self, streams):
        x1, x2 = tf.split(streams, 2, axis=-1)
        with _hooks_reachable(self):
            y1 = x1 + self.f(x2, mask=_all_positions(streams), training=False)
            y2 = x2 + self.g(y1, training=False)
        return tf.concat([y1, y2], axis=-1)


def quantization_stages(backbone):
    """The `{"pre_block_layers", "sequential_blocks"}` structure Keras'
    calibrated modes run, for a `ReformerBackbone`."""
    return {
        "pre_block_layers": [EmbeddingStage(backbone)],
        "sequential_blocks": [
            ReversiblePairStage(f, g) for f, g in backbone.reversible_stack.blocks
        ],
    }


def block_layers_only(backbone, filters):
    """`filters` narrowed to the reversible blocks' layers (see the module
    docstring), read as Keras reads `quantize(filters=...)`."""
    inside = {
        id(layer)
        for pair in backbone.reversible_stack.blocks
        for block in pair
        for layer in block._flatten_layers()
    }
    return lambda layer: id(layer) in inside and _compat.should_quantize_layer(
        layer, filters
    )
