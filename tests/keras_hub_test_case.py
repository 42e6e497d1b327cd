"""keras-hub's own `TestCase` (its backbone, task, preset and preprocessor
checks), importable without `grain`.

keras-hub's test module imports `grain` at the top, for one helper we do not
use (`run_grain_preprocessing_test`). Installing grain would change what we
test: keras-hub's tasks then turn NumPy inputs into grain datasets instead of
`tf.data` ones, unlike a user's install (keras-hub does not depend on grain).
So keras-hub's pipeline code is imported first, finding no grain, and only
then a placeholder module stands in for grain while `TestCase` is imported.
"""

import sys
import types

import keras_hub.src.utils.pipeline_model  # noqa: F401  (decides on grain first)

if "grain" not in sys.modules:
    try:
        import grain  # noqa: F401
    except ImportError:
        sys.modules["grain"] = types.ModuleType("grain")
        try:
            from keras_hub.src.tests.test_case import TestCase  # noqa: F401
        finally:
            del sys.modules["grain"]

from keras_hub.src.tests.test_case import TestCase  # noqa: E402,F401
