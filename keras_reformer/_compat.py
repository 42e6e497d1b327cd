"""Every import of private Keras / keras-hub / TensorFlow internals, in one place.

The library needs a few things that neither Keras nor TensorFlow exposes
publicly (nor keras-hub, whose tokenizer and preprocessor methods ours
override). Each is imported here, once, so that an upgrade that moves one
fails here with a message naming it (tests/test_compat.py imports each), and
so that a Keras backend other than TensorFlow is refused clearly instead of
failing deep inside a layer.
"""

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_reformer needs the TensorFlow backend of Keras (its reversible "
        "and chunked layers are tf.custom_gradient functions). Set "
        "KERAS_BACKEND=tensorflow before importing keras. Received: "
        f"keras.backend.backend()={keras.backend.backend()!r}"
    )


def _private(what, why, importer):
    try:
        return importer()
    except (ImportError, AttributeError) as error:  # pragma: no cover - upgrade guard
        raise ImportError(
            f"keras_reformer could not import {what} ({why}); the installed "
            f"Keras {keras.__version__} / TensorFlow moved it. Please report "
            "this with both versions."
        ) from error


def _keras_masks():
    from keras.src.backend import get_keras_mask, set_keras_mask

    return get_keras_mask, set_keras_mask


# MultiHeadAttention reads and attaches `_keras_mask` with these two helpers;
# there is no public equivalent.
get_keras_mask, set_keras_mask = _private(
    "keras.src.backend.get_keras_mask/set_keras_mask",
    "reading and attaching the Keras mask, as MultiHeadAttention does",
    _keras_masks,
)


def _autocast_scope():
    from keras.src.backend.common.variables import AutocastScope

    return AutocastScope


# Lets ChunkedFeedForward read float32 kernels raw inside its own gradient.
AutocastScope = _private(
    "keras.src.backend.common.variables.AutocastScope",
    "turning off variable autocasting inside a custom gradient",
    _autocast_scope,
)


def _record():
    from tensorflow.python.eager import record

    return record


# Stops every gradient tape at once (what tf.recompute_grad uses).
tape_record = _private(
    "tensorflow.python.eager.record",
    "running a recomputed forward pass without the outer tape recording it",
    _record,
)


def _control_flow_util():
    from tensorflow.python.ops import control_flow_util

    return control_flow_util


control_flow_util = _private(
    "tensorflow.python.ops.control_flow_util",
    "telling whether a gradient runs inside an XLA context",
    _control_flow_util,
)


def _dynamic_update_slice():
    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

    return dynamic_update_slice


# In-place slice writes under XLA (no public tf.* op lowers to it).
dynamic_update_slice = _private(
    "tensorflow.compiler.tf2xla.python.xla.dynamic_update_slice",
    "in-place writes of the chunked feed-forward's slices",
    _dynamic_update_slice,
)


def _xla_sort():
    from tensorflow.compiler.tf2xla.python.xla import sort

    return sort


# XLA's sort of one operand along the last axis (tf.sort and tf.argsort both
# lower to TopK of (key, index) pairs, several times slower on XLA:CPU).
xla_sort = _private(
    "tensorflow.compiler.tf2xla.python.xla.sort",
    "sorting LSH bucket keys under XLA",
    _xla_sort,
)


def _gradient_registry():
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry
    registry.list()  # fails here, not later, if the Registry API moved
    registry._registry  # noqa: B018  (the dict entries are removed from)
    return registry


# Where tf.custom_gradient registers each traced gradient function, for good:
# a throwaway trace (a Keras symbolic call) would otherwise stay alive.
gradient_registry = _private(
    "tensorflow.python.framework.ops._gradient_registry",
    "forgetting the custom gradients of throwaway (symbolic) traces",
    _gradient_registry,
)


def _quantize_filter():
    from keras.src.quantizers.utils import should_quantize_layer

    return should_quantize_layer


# Keras' reading of `quantize(filters=...)` (a regex, a list of them or a
# callable), so that a Reformer model can narrow the calibrated modes to its
# blocks and still honour the user's filters exactly as Keras would.
should_quantize_layer = _private(
    "keras.src.quantizers.utils.should_quantize_layer",
    "combining a user's quantize filters with the calibrated modes' own",
    _quantize_filter,
)



def _keras_hub_presets():
    from keras_hub.src.utils import preset_utils

    return preset_utils


def _keras_hub_tensor_utils():
    from keras_hub.src.utils import tensor_utils

    tensor_utils.preprocessing_function  # noqa: B018  (fail here if moved)
    tensor_utils.strip_to_ragged  # noqa: B018
    tensor_utils.canonicalize_python_token_inputs  # noqa: B018
    return tensor_utils


# keras-hub's private modules, imported when first used (by the models'
# tokenizer and preprocessor), not when the layers load: keras-hub's
# utilities load TF Text, which the layers and `keras_reformer.text` never
# need.
#
# - keras_hub_presets: the preset file names and the loader of a preset's
#   serialized layers. A tokenizer or preprocessor saved alone (no backbone
#   config, which the public `from_preset` needs to pick a class) is read
#   with the loader.
# - keras_hub_tensor_utils: the tokenizer and preprocessor override
#   keras-hub methods that keras-hub wraps with `preprocessing_function`
#   (inputs to tf tensors on the CPU); the overrides are wrapped the same
#   way, and reuse its input canonicalization and special-token stripping
#   so they behave as the methods they replace.
_LAZY = {
    "keras_hub_presets": (
        "keras_hub.src.utils.preset_utils",
        "preset file names and loading a tokenizer-only preset",
        _keras_hub_presets,
    ),
    "keras_hub_tensor_utils": (
        "keras_hub.src.utils.tensor_utils",
        "wrapping tokenizer overrides as keras-hub wraps the methods they replace",
        _keras_hub_tensor_utils,
    ),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _private(*_LAZY[name])
    globals()[name] = value
    return value
