"""The default corpus: text files that ship with every Python installation."""

import glob
import os
import sysconfig


def default_corpus_files(max_bytes=None):
    """Sorted paths of the Python standard library's top-level `.py` files.

    They are present wherever Python is, need no download, and give several
    megabytes of real, varied text (code, docstrings, comments). The order is
    deterministic; `max_bytes` stops once that many bytes are listed.
    """
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
