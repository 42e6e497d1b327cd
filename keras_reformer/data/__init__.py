"""tf.data pipelines for byte-level language modelling."""

from keras_reformer.data.corpus import default_corpus_files  # noqa: F401
from keras_reformer.data.text_windows import (  # noqa: F401
    byte_windows,
    split_files,
    lm_dataset,
)
