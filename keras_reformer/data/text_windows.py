"""Files -> UTF-8 bytes -> fixed windows -> next-byte language-model batches."""

import os

import tensorflow as tf

from keras_reformer import _checks, _token_ids
from keras_reformer.data import _batch_shape
from keras_reformer.text import byte_tokenizer


def _file_list(files):
    """`files` as a list of str paths; each must exist (local or tf.io.gfile)."""
    if isinstance(files, (str, bytes, os.PathLike)) or not hasattr(files, "__iter__"):
        raise ValueError(
            f"`files` must be a list of file paths. Received: files={files!r}"
        )
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("`files` must hold at least one path. Received: files=[]")
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    if missing:
        raise FileNotFoundError(f"`files` lists paths that do not exist: {missing[:5]}")
    return files


def split_files(files, validation_every=10):
    """Splits files into training and validation files, deterministically.

    Every `validation_every`-th file (the 10th, 20th, ... by default) goes
    to validation; if there are fewer, the last file does. The split depends
    only on the order of `files`, so the same list always splits the same.

    Args:
        files: list of file paths (at least 2).
        validation_every: int >= 2. One file in this many validates.
            Defaults to `10`.

    Returns:
        A tuple `(train_files, validation_files)` of two non-empty lists
        that are disjoint by position and together hold every file once,
        each in the order of `files`.

    Example:

    >>> train, validation = split_files([f"{i}.txt" for i in range(5)], 2)
    >>> train, validation
    (['0.txt', '2.txt', '4.txt'], ['1.txt', '3.txt'])
    """
    if isinstance(files, (str, bytes)) or not isinstance(files, (list, tuple)):
        raise ValueError(f"`files` must be a list of file paths. Received: files={files!r}")
    files = list(files)
    if len(files) < 2:
        raise ValueError(
            "`files` must hold at least 2 paths to split into training and "
            f"validation. Received: {len(files)} ({files!r})"
        )
    validation_every = _checks.int_in_range(
        "validation_every", validation_every, 2, why="(1 leaves no training file)")
    # By position, so that a path listed twice is not dropped from training.
    chosen = set(range(validation_every - 1, len(files), validation_every))
    chosen = chosen or {len(files) - 1}
    train = [f for i, f in enumerate(files) if i not in chosen]
    validation = [f for i, f in enumerate(files) if i in chosen]
    return train, validation


def byte_windows(files, window):
    """A dataset of windows of `window` consecutive bytes of `files`.

    The files are read in the order given, turned into byte ids
    (`keras_reformer.text.tokenize`: the UTF-8 bytes, 0..255) and packed end
    to end, so a file boundary may fall inside a window; the last partial
    window is dropped. Nothing is shuffled or padded.

    Args:
        files: list of file paths (anything `tf.io.read_file` reads).
        window: int. Bytes per window.

    Returns:
        A `tf.data.Dataset` of int32 tensors of shape `(window,)`.
    """
    files = _file_list(files)
    window = _checks.positive_int("window", window)
    paths = tf.data.Dataset.from_tensor_slices(files)
    tokens = paths.map(tf.io.read_file).map(byte_tokenizer.tokenize)
    return tokens.unbatch().batch(window, drop_remainder=True)


def lm_dataset(files, seq_len, batch_size, shuffle=True, seed=0, repeat=True,
               with_padding_mask=True, vocabulary_size=None):
    """Batches for next-byte prediction from text files, ready for `fit`.

    The bytes of `files` (see `byte_windows`) are cut into consecutive,
    non-overlapping windows `w` of `seq_len + 1` bytes; each gives inputs
    `w[:-1]` and targets `w[1:]`. Windows are shuffled (if `shuffle`),
    batched (the last partial batch dropped), repeated (if `repeat`) and
    prefetched. They are never padded, so the padding mask is all ones.

    Args:
        files: list of file paths.
        seq_len: int. Length of each input (and target) sequence.
        batch_size: int. Sequences per batch.
        shuffle: bool. Shuffle the windows (in a buffer of 1024, afresh
            every epoch). Defaults to `True`.
        seed: int >= 0. Seed of the shuffle. Defaults to `0`.
        repeat: bool. Repeat the data forever. Defaults to `True`. If
            `False`, the batches still hold `batch_size` sequences but the
            element spec leaves the batch size unknown (`None`): Keras 3.15
            in graph mode evaluates a finite dataset with a static batch
            size wrongly (see `keras_reformer/data/_batch_shape.py`).
        with_padding_mask: bool. Give inputs as a dict `{"token_ids",
            "padding_mask"}` (the inputs of `ReformerBackbone`); if `False`,
            the token ids alone. Defaults to `True`.
        vocabulary_size: int or `None`. If given, every byte id (inputs and
            targets) is checked in tf.data to be in `[0, vocabulary_size)`:
            a model with fewer than 256 ids fails at the first byte it cannot
            embed (`InvalidArgumentError` naming it), where under XLA it
            would silently use a wrong embedding row. Defaults to `None`
            (byte ids are always in [0, 256)).

    Returns:
        A `tf.data.Dataset` of `(inputs, targets)`: `targets` is int32 of
        shape `(batch_size, seq_len)`; `inputs` is a tensor of the same
        shape and dtype, or a dict of two such tensors.

    Example:

    >>> from keras_reformer import data
    >>> files = data.default_corpus_files(max_bytes=50_000)
    >>> ds = data.lm_dataset(files, seq_len=128, batch_size=4)
    >>> inputs, targets = next(iter(ds))
    >>> inputs["token_ids"].shape, targets.shape
    (TensorShape([4, 128]), TensorShape([4, 128]))
    """
    seq_len = _checks.positive_int("seq_len", seq_len)
    batch_size = _checks.positive_int("batch_size", batch_size)
    seed = _checks.non_negative_int("seed", seed)
    shuffle = _checks.boolean("shuffle", shuffle)
    repeat = _checks.boolean("repeat", repeat)
    with_padding_mask = _checks.boolean("with_padding_mask", with_padding_mask)
    if vocabulary_size is not None:
        vocabulary_size = _token_ids.check_vocabulary_size(vocabulary_size)
    ds = byte_windows(files, seq_len + 1)
    if vocabulary_size is not None:
        ds = ds.map(lambda window: _token_ids.assert_token_ids(
            window, vocabulary_size, "byte_ids"))
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
    else:
        # Finite: leave the batch size out of the element spec, or Keras
        # 3.15's graph-mode `evaluate` divides the loss by one step too many.
        ds = _batch_shape.relax_batch_size(ds)
    return ds.prefetch(tf.data.AUTOTUNE)
