"""The default corpus: text files that ship with every Python installation."""

import glob
import os
import sysconfig

from keras_reformer import _checks


def default_corpus_files(max_bytes=None):
    """Paths of the Python standard library's top-level `.py` files, sorted.

    They are present wherever Python is, need no download, and give several
    megabytes of real, varied text (code, docstrings, comments): enough to
    train and evaluate a small byte-level language model.

    Args:
        max_bytes: int or `None`. Stop listing once the files listed hold
            at least this many bytes (the last file is kept whole).
            Defaults to `None`: every file.

    Returns:
        A list of absolute paths (str), sorted by name, none of them empty.
        The same installation always gives the same list.

    Raises:
        FileNotFoundError: if the standard library directory holds no
            `.py` file.

    Example:

    >>> from keras_reformer import data
    >>> files = data.default_corpus_files(max_bytes=100_000)
    >>> train, validation = data.split_files(files, validation_every=2)
    """
    _checks.positive_int("max_bytes", max_bytes, allow_none=True)
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        size = os.path.getsize(path)
        if size == 0:
            continue
        files.append(path)
        total += size
        if max_bytes is not None and total >= max_bytes:
            break
    if not files:
        raise FileNotFoundError(f"No .py files found in the standard library at {root}")
    return files
