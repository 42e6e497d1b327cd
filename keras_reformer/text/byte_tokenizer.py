"""UTF-8 bytes as token ids (0..255), split by tensorflow-text's ByteSplitter.

Byte-level models need no vocabulary file, handle any text, and keep the
serving graph to core TF and TF Text ops.
"""

import functools

import tensorflow as tf

VOCABULARY_SIZE = 256
# A python list, not a tensor: creating tensors at import would fix the
# device configuration before users can set up logical devices.
_BYTES = [bytes([i]) for i in range(VOCABULARY_SIZE)]


@functools.lru_cache(maxsize=None)
def _splitter():
    # Imported on first use: tensorflow_text adds ~100 MB to every process
    # that imports keras_reformer, most of which never tokenize.
    import tensorflow_text as tf_text

    return tf_text.ByteSplitter()


def tokenize(strings):
    """Strings -> int32 byte ids; a scalar gives a 1-D tensor, a batch a ragged one."""
    return tf.cast(_splitter().split(strings), tf.int32)


def detokenize(ids):
    """int byte ids (1-D, 2-D or ragged) -> UTF-8 strings (invalid bytes replaced).

    Token ids must be in 0..255; anything else is a ValueError-like
    InvalidArgument at run time.
    """
    ids = tf.convert_to_tensor(ids) if not isinstance(ids, tf.RaggedTensor) else ids
    values = ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids
    tf.debugging.assert_less(tf.cast(values, tf.int32), VOCABULARY_SIZE,
                             message="byte ids must be < 256")
    tf.debugging.assert_non_negative(tf.cast(values, tf.int32),
                                     message="byte ids must be >= 0")
    chars = tf.gather(_BYTES, tf.cast(ids, tf.int32))
    joined = tf.strings.reduce_join(chars, axis=-1)
    return tf.strings.unicode_transcode(
        joined, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
    )
