"""UTF-8 bytes as token ids (0..255), split with core TensorFlow ops.

Byte-level models need no vocabulary file and handle any text. Tokenizing
with core ops only (`ReduceJoin`, `DecodeRaw`, `StringLength`) keeps every
graph that tokenizes loadable by stock TensorFlow, `saved_model_cli` and TF
Serving, which lack the TF Text op `ByteSplitWithOffsets`. It also makes
tf.data faster: on 2 CPU cores, one 1.2 MB file splits in ~0.6 ms (TF Text's
ByteSplitter: ~15 ms), a batch of 300 short strings in ~0.8 ms (~3.6 ms).
"""

import tensorflow as tf

VOCABULARY_SIZE = 256
# A python list, not a tensor: creating tensors at import would fix the
# device configuration before users can set up logical devices.
_BYTES = [bytes([i]) for i in range(VOCABULARY_SIZE)]


def tokenize(strings):
    """Strings -> int32 byte ids, exactly `s.encode("utf-8")` of each string.

    A scalar string gives a 1-D tensor; a tensor of strings of rank `r`
    gives a `tf.RaggedTensor` of rank `r + 1` (the last dimension ragged).
    Any bytes are accepted (the string need not be valid UTF-8).
    """
    strings = tf.convert_to_tensor(strings)
    if strings.dtype != tf.string:
        raise TypeError(
            f"`strings` must be a tf.string tensor. Received dtype={strings.dtype.name}"
        )
    rank = strings.shape.rank
    if rank is None:
        raise ValueError("`strings` must have a known rank (a scalar or a tensor "
                         "of strings). Received a tensor of unknown rank.")
    if rank == 0:
        # uint8, then int32: `DecodeRaw` to int8 would make bytes >= 128 negative.
        return tf.cast(tf.io.decode_raw(strings, tf.uint8), tf.int32)
    flat = tf.reshape(strings, [-1])
    # All strings joined give every byte once, in order; each string's byte
    # length splits them back into rows. No padding to the longest string.
    values = tf.cast(tf.io.decode_raw(tf.strings.reduce_join(flat), tf.uint8), tf.int32)
    lengths = tf.cast(tf.strings.length(flat, unit="BYTE"), tf.int64)
    ragged = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
    shape = tf.shape(strings, out_type=tf.int64)
    for axis in range(rank - 1, 0, -1):
        # nrows given: it cannot be inferred when a dimension is 0.
        ragged = tf.RaggedTensor.from_uniform_row_length(
            ragged, shape[axis], nrows=tf.reduce_prod(shape[:axis]), validate=False
        )
    return ragged


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
