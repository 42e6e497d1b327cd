"""Keep TensorFlow's start-up logs out of the examples' output.

Import it before tensorflow or keras (`import _quiet  # noqa: F401`); the
examples then print their progress and results, and real errors still show.

- `TF_CPP_MIN_LOG_LEVEL=2` (unless already set) hides TF's INFO and WARNING
  lines, e.g. the XLA service lines (INFO) and "Ignoring Assert operator"
  (a WARNING, once per assertion XLA drops), and keeps ERROR lines.
- TF prints some lines while it loads, before its logging reads that
  variable (oneDNN, "Could not find cuda drivers"), and an ERROR
  "failed call to cuInit" on machines without a GPU. Those are caught on the
  stderr file descriptor while TF loads and lists its devices, and every
  other line caught is printed afterwards.

`TF_CPP_MIN_LOG_LEVEL=0` shows everything, as without this module.
"""

import os
import re
import sys
import tempfile

_START_UP_NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers",
    r"failed call to cuInit",
    r"cpu_feature_guard\.cc",
    r"^To enable the following instructions: ",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
]))


def quiet_tensorflow():
    """Set TF's log level and import it with its start-up noise removed."""
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if level == "0" or "tensorflow" in sys.modules:
        return  # asked for everything, or too late to catch anything
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        # The C++ logs write to file descriptor 2 directly, not sys.stderr.
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf

            # Loads the GPU platform (cuInit) now, inside the window. Logical
            # devices can still be configured after listing physical ones.
            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode("utf-8", "replace")
            sys.stderr.writelines(line for line in text.splitlines(keepends=True)
                                  if not _START_UP_NOISE.search(line))
            sys.stderr.flush()


quiet_tensorflow()
