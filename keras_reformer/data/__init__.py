"""`keras_reformer.data`: tf.data pipelines for byte-level language modelling.

Public API:

* `default_corpus_files(max_bytes=None)`: a corpus that needs no download
  (the Python standard library's `.py` files).
* `split_files(files, validation_every=10)`: a deterministic, disjoint
  train/validation split of a list of files.
* `byte_windows(files, window)`: fixed windows of the files' UTF-8 bytes.
* `lm_dataset(files, seq_len, batch_size, ...)`: `(inputs, next-byte
  targets)` batches for `model.fit`.
* `check_token_ids(dataset, vocabulary_size)`: fail in tf.data on an id
  outside the vocabulary (XLA-compiled steps cannot check it).

Example:

>>> from keras_reformer import data
>>> train, validation = data.split_files(data.default_corpus_files())
>>> ds = data.lm_dataset(train, seq_len=256, batch_size=8)
"""

from keras_reformer.data.corpus import default_corpus_files  # noqa: F401
from keras_reformer.data.text_windows import (  # noqa: F401
    byte_windows,
    lm_dataset,
    split_files,
)
from keras_reformer.data.token_ids import check_token_ids  # noqa: F401
