"""A token-id check that every replica of a distributed step fails together.

`prepare_fit`'s per-replica step checks its ids before the XLA part. With a
check of its own in each replica, only the replica holding the bad id
fails; the others go on into the gradient all-reduce, the runtime cancels
that collective, and TF then aborts the process's collective executor:
every later step fails with "Collective ops is aborted ... Restart your
program to reset", and which error `fit` reports (the bad id or the
cancellation) is a race. Here the replicas first all-reduce a small table
(one row per replica: bad?, id, where), then all assert on the same table,
so all fail with the same message before any other collective starts.
"""

import tensorflow as tf

from keras_reformer.layers.token_id_check import (
    assert_token_ids, behind_assertion, message_tensor, out_of_range,
)
from keras_reformer.ops.recompute import in_xla_context


def assert_token_ids_in_sync(ids, vocabulary_size, name="token_ids"):
    """`assert_token_ids` for a replica's part of a batch, failing in every
    replica (same message, naming the replica) when any replica's part holds
    an id outside `[0, vocabulary_size)`. The plain check outside a replica
    context with several replicas, and for ids of unknown rank."""
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
