"""Files -> UTF-8 bytes (tensorflow-text) -> fixed windows -> LM batches."""

import tensorflow as tf

from keras_reformer.text import byte_tokenizer


def split_files(files, validation_every=10):
    """Deterministic split: every `validation_every`-th file validates."""
    files = list(files)
    if len(files) < 2:
        raise ValueError(
            f"Need at least 2 files to split into train and validation. Received {len(files)}"
        )
    validation = files[validation_every - 1 :: validation_every] or files[-1:]
    train = [f for f in files if f not in set(validation)]
    return train, validation


def byte_windows(files, window):
    """Dataset of int32 windows of `window` consecutive bytes of the files.

    Files are read in order, tokenized into bytes with tensorflow-text and
    packed end to end (a file boundary may fall inside a window); the last
    partial window is dropped.
    """
    files = tf.data.Dataset.from_tensor_slices(list(files))
    tokens = files.map(tf.io.read_file).map(byte_tokenizer.tokenize)
    return tokens.unbatch().batch(window, drop_remainder=True)


def lm_dataset(files, seq_len, batch_size, shuffle=True, seed=0, repeat=True,
               with_padding_mask=True):
    """Batches of ({"token_ids", "padding_mask"}, next-byte targets).

    Windows of `seq_len + 1` bytes give inputs `w[:-1]` and targets `w[1:]`;
    shuffled (windows), batched, repeated and prefetched. Windows are never
    padded; with `with_padding_mask=False` the inputs are the token ids alone.
    """
    ds = byte_windows(files, seq_len + 1)
    if shuffle:
        ds = ds.shuffle(1024, seed=seed, reshuffle_each_iteration=True)

    def split(window):
        inputs = window[:-1]
        if not with_padding_mask:
            return inputs, window[1:]
        return (
            {"token_ids": inputs, "padding_mask": tf.ones_like(inputs)},
            window[1:],
        )

    ds = ds.map(split, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)
