"""Token-id checks shared by `TokenIdCheck`, the data pipelines and the models.

Token ids must be integers in `[0, vocabulary_size)`. The checks come in
three forms with one message, which names the first offending id, where it
is, `vocabulary_size` and the allowed range:

- `check_token_ids_numpy`: arrays (and eager tensors), checked at once, a
  `ValueError`;
- `assert_token_ids`: tensors behind an assertion that runs eagerly, in a
  `tf.function` and in tf.data (an `InvalidArgumentError`). XLA drops
  assertions, so inside a compiled function it checks nothing and callers
  must run it before the compiled step;
- `assert_token_ids_in_sync`: the same for one replica's part of a
  distributed batch, failing in every replica together.

A token-id tensor of a non-integer dtype is a `TypeError`
(`check_integer_dtype`).
"""

import numpy as np
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer.ops.recompute import in_xla_context

# Ids come out of `TokenIdCheck` as int32, so every id below the vocabulary
# size must fit.
MAX_VOCABULARY_SIZE = 2**31


def check_vocabulary_size(value, name="vocabulary_size"):
    """`value` as an int if it is an int in `[1, 2**31]`, else a `ValueError`."""
    return _checks.int_in_range(name, value, 1, MAX_VOCABULARY_SIZE,
                                "(2**31 at most: ids are int32)")


def check_integer_dtype(dtype, name="token_ids"):
    """Raises a `TypeError` unless `dtype` is an integer dtype."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_integer:
        raise TypeError(
            f"`{name}` must be integer token ids. Received: {name}.dtype={dtype.name}"
        )


def _message(vocabulary_size, negative, where, value):
    # "must be < vocabulary_size=V" / "must be >= 0" are what callers (and
    # TF Serving clients) match on; the rest says what is allowed and what
    # came. `where` and `value` are str or string tensors.
    side = "must be >= 0" if negative else f"must be < vocabulary_size={vocabulary_size}"
    return (
        f"token ids {side}: allowed ids are [0, vocabulary_size) with "
        f"vocabulary_size={vocabulary_size}. Received: ", where, " = ", value,
    )


def check_token_ids_numpy(ids, vocabulary_size, name="token_ids"):
    """Raises a `ValueError` if an id of the integer array `ids` is outside
    `[0, vocabulary_size)`; returns `ids` (as a numpy array) otherwise.

    Non-integer arrays are returned unchecked: the model refuses their dtype.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        return ids
    # Compared in the ids' own dtype: an int64 2**32 + 5 is refused, not
    # wrapped into range by a cast.
    bad = (ids < 0) | (ids >= vocabulary_size)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"{name}[{', '.join(map(str, index))}]"
        value = ids[index]
        raise ValueError("".join(_message(vocabulary_size, value < 0, where, str(value))))
    return ids


def message_tensor(vocabulary_size, name, index, value, suffix=""):
    """The bad-id message as a string tensor: `value` (int64 scalar) found
    at `index` (int64 vector) of `name`, with `suffix` (a str) appended."""
    where = tf.strings.join([
        f"{name}[", tf.strings.reduce_join(tf.strings.as_string(index), separator=", "),
        "]",
    ])
    texts = [tf.strings.join([*_message(vocabulary_size, negative, where,
                                        tf.strings.as_string(value)), suffix])
             for negative in (True, False)]
    return tf.where(value < 0, texts[0], texts[1])


def out_of_range(ids, vocabulary_size):
    """`(wide, bad)`: the integer `ids` as int64 and where they are outside
    `[0, vocabulary_size)`. int64 holds every id of every signed dtype and
    of uint8..uint32, so no id wraps into range; vocabulary_size <= 2**31
    fits too."""
    wide = tf.cast(ids, tf.int64)
    return wide, tf.logical_or(wide < 0, wide >= vocabulary_size)


def behind_assertion(ids, any_bad, message):
    """`ids` behind an assertion that `any_bad` is false, whose text is
    `message()`, a string tensor built only when it is true."""
    text = tf.cond(any_bad, message, lambda: tf.constant(""))
    check = tf.debugging.Assert(tf.logical_not(any_bad), [text])
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def assert_token_ids(ids, vocabulary_size, name="token_ids"):
    """`ids` (same dtype) behind an assertion that each is in
    `[0, vocabulary_size)`: an `InvalidArgumentError` naming the first bad id
    when it runs, eagerly, in a `tf.function` or in tf.data.

    Inside an XLA-compiled function it returns `ids` unchecked: XLA drops
    assertions (and cannot compile the message's string ops), so callers
    must run it outside the compiled step.
    """
    ids = tf.convert_to_tensor(ids)
    check_integer_dtype(ids.dtype, name)
    if in_xla_context():
        return ids
    wide, bad = out_of_range(ids, vocabulary_size)

    def message():
        index = tf.where(bad)[0]
        return message_tensor(vocabulary_size, name, index, tf.gather_nd(wide, index))

    return behind_assertion(ids, tf.reduce_any(bad), message)


def assert_token_ids_in_sync(ids, vocabulary_size, name="token_ids"):
    """`assert_token_ids` for a replica's part of a batch, failing in every
    replica (same message, naming the replica) when any replica's part holds
    an id outside `[0, vocabulary_size)`. The plain check outside a replica
    context with several replicas, and for ids of unknown rank.

    Why all together: with a check of its own in each replica, only the
    replica holding the bad id fails; the others go on into the gradient
    all-reduce, the runtime cancels that collective, and TF then aborts the
    process's collective executor: every later step fails with "Collective
    ops is aborted ... Restart your program to reset", and which error `fit`
    reports (the bad id or the cancellation) is a race. Here the replicas
    first all-reduce a small table (one row per replica: bad?, id, where),
    then all assert on the same table, so all fail with the same message
    before any other collective starts.
    """
    context = tf.distribute.get_replica_context()
    ids = tf.convert_to_tensor(ids)
    rank = ids.shape.rank
    if (context is None or context.num_replicas_in_sync == 1 or rank is None
            or in_xla_context() or not ids.dtype.is_integer):
        return assert_token_ids(ids, vocabulary_size, name)
    replicas = context.num_replicas_in_sync
    wide, bad = out_of_range(ids, vocabulary_size)
    found = tf.cast(tf.reduce_any(bad), tf.int64)
    # The first bad position (zeros when none): tf.where's first row, padded.
    index = tf.concat([tf.where(bad)[:1], tf.zeros([1, rank], tf.int64)], 0)[0]
    value = tf.gather_nd(wide, index) if rank else wide
    row = found * tf.concat([[found, value], index], 0)
    mine = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.int64)
    table = context.all_reduce("sum", mine[:, None] * row[None, :])
    flags = table[:, 0] > 0
    any_bad = tf.reduce_any(flags)

    def message():
        first = tf.argmax(tf.cast(flags, tf.int32), output_type=tf.int32)
        suffix = tf.strings.join([
            " (in replica ", tf.strings.as_string(first), " of ", str(replicas),
            ", whose part of the batch it indexes)",
        ])
        return message_tensor(vocabulary_size, name, table[first, 2:],
                              table[first, 1], suffix)

    return behind_assertion(ids, any_bad, message)
