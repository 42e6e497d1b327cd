"""keras_reformer._compat: each private import is still where Keras/TF keep it.

Every test imports a private name from the place Keras or TensorFlow defines
it, independently of _compat, and checks that _compat exposes that very
object. When an upgrade moves one, its test here fails by name.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from keras_reformer import _compat


def test_get_keras_mask():
    from keras.src.backend import get_keras_mask

    assert _compat.get_keras_mask is get_keras_mask


def test_set_keras_mask():
    from keras.src.backend import set_keras_mask

    assert _compat.set_keras_mask is set_keras_mask


def test_keras_mask_helpers_round_trip():
    # The two helpers still mean what MultiHeadAttention uses them for.
    import tensorflow as tf

    x = tf.zeros((1, 3))
    mask = tf.constant([[True, False, True]])
    _compat.set_keras_mask(x, mask)
    assert _compat.get_keras_mask(x) is mask


def test_autocast_scope():
    from keras.src.backend.common.variables import AutocastScope

    assert _compat.AutocastScope is AutocastScope


def test_tape_record():
    from tensorflow.python.eager import record

    assert _compat.tape_record is record
    assert callable(record.stop_recording)


def test_control_flow_util():
    from tensorflow.python.ops import control_flow_util

    assert _compat.control_flow_util is control_flow_util
    assert callable(control_flow_util.GraphOrParentsInXlaContext)


def test_dynamic_update_slice():
    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

    assert _compat.dynamic_update_slice is dynamic_update_slice


def test_xla_sort():
    from tensorflow.compiler.tf2xla.python.xla import sort

    assert _compat.xla_sort is sort


EXPECTED_MESSAGE = "keras_reformer needs the TensorFlow backend of Keras"


def import_in_subprocess(code, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_other_backend_refused_with_clear_message():
    # Neither jax nor scipy (which Keras' numpy backend needs) is a
    # dependency, so the process starts on TensorFlow and then reports
    # another backend, the value _compat reads, before importing the library.
    code = (
        "from keras.src.backend import config\n"
        "config._BACKEND = 'jax'\n"
        "import keras_reformer\n"
    )
    result = import_in_subprocess(code, "tensorflow")
    assert result.returncode != 0
    assert "ImportError: " + EXPECTED_MESSAGE in result.stderr
    assert "KERAS_BACKEND=tensorflow" in result.stderr
    assert "keras.backend.backend()='jax'" in result.stderr


@pytest.mark.parametrize("backend,module", [("jax", "jax"), ("numpy", "scipy")])
def test_real_other_backend_refused(backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {backend} backend of Keras needs {module}, not installed")
    result = import_in_subprocess("import keras_reformer", backend)
    assert result.returncode != 0
    assert EXPECTED_MESSAGE in result.stderr
    assert f"keras.backend.backend()={backend!r}" in result.stderr


def test_keras_hub_presets():
    from keras_hub.src.utils import preset_utils

    assert _compat.keras_hub_presets is preset_utils
    # The names a preset directory's files have, as save_to_preset writes them.
    assert preset_utils.CONFIG_FILE == "config.json"
    assert preset_utils.TOKENIZER_CONFIG_FILE == "tokenizer.json"
    assert preset_utils.PREPROCESSOR_CONFIG_FILE == "preprocessor.json"
    assert callable(preset_utils.KerasPresetLoader(".", config=None).load_tokenizer)


def test_keras_hub_tensor_utils():
    import tensorflow as tf
    from keras_hub.src.utils import tensor_utils

    assert _compat.keras_hub_tensor_utils is tensor_utils
    rows, batched = tensor_utils.canonicalize_python_token_inputs([1, 2])
    assert (rows, batched) == ([[1, 2]], False)
    ragged = tensor_utils.strip_to_ragged(
        tf.constant([[7, 1, 2, 0]]), tf.constant([[True, True, True, False]]), [7]
    )
    assert ragged.to_list() == [[1, 2]]
