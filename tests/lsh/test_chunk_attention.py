"""The grouped (looped, recomputing) path equals the all-at-once path."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.lsh.chunk_attention import ChunkSettings, attend, group_size
from keras_reformer.lsh.sorting import sort_order


def problem(seed=0, batch=2, heads=2, rounds=3, length=64, width=8):
    rng = np.random.default_rng(seed)
    qk = tf.constant(rng.normal(size=(batch, heads, length, width)), tf.float32)
    v = tf.constant(rng.normal(size=(batch, heads, length, width)), tf.float32)
    buckets = tf.constant(rng.integers(0, 4, size=(batch, heads, rounds, length)), tf.int32)
    valid = np.ones((batch, length), bool)
    valid[-1, -9:] = False
    return qk, v, buckets, tf.constant(valid)


def run(qk, v, buckets, valid, budget, **kwargs):
    with tf.GradientTape() as tape:
        tape.watch([qk, v])
        out = attend(qk, v, sort_order(buckets, valid, 4), valid,
                     ChunkSettings(bucket_size=8, group_elements=budget, **kwargs))
        loss = tf.reduce_sum(out * tf.sin(out))
    return out, tape.gradient(loss, [qk, v])


# Every pair of (causal rule, mode), every (rule, budget) and every (mode,
# budget) once: 12 cases cover what the 36 of the full product would.
# Budgets: one row per group; one (row, round) per iteration; ranges of 2
# chunks; ranges of 1 chunk.
PAIRWISE = [(causal, mode, budget)
            for i, causal in enumerate([False, True, "strict"])
            for j, mode in enumerate(["eager", "graph", "jit"])
            for k, budget in enumerate([3072, 1024, 256, 128])
            if (i + j + k) % 3 == 0]


@pytest.mark.parametrize("causal, mode, budget", PAIRWISE)
def test_grouped_equals_single_pass(causal, mode, budget):
    # "strict": the causal rule without the self key (value shift), where
    # queries with no allowed key in any round output zeros.
    qk, v, buckets, valid = problem()
    kwargs = {"causal": True, "strict": True} if causal == "strict" else {"causal": causal}
    fn = run
    if mode != "eager":
        fn = tf.function(run, jit_compile=mode == "jit")
    # 4 (batch, head) rows of 3 rounds x 64 x 16 logits: a budget of 3072
    # gives one row per group (4 loop iterations); 1024, one (row, round)
    # per iteration (12), the rounds combined after the loop; 256 and 128,
    # each (row, round) a range of 2 or 1 of its 8 chunks at a time.
    out_a, grads_a = fn(qk, v, buckets, valid, 2**30, **kwargs)
    out_b, grads_b = fn(qk, v, buckets, valid, budget, **kwargs)
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [3072, 1024, 128])
def test_masks_and_causal_rows_equal_single_pass(budget):
    # A query-key mask per batch row, and per-row causal flags that differ
    # between the rows (row 0 follows the causal rule, row 1 the windows):
    # every loop strategy, ranges of chunks included, reads each row's own.
    qk, v, buckets, valid = problem()
    rng = np.random.default_rng(1)
    mask = tf.constant(rng.random((2, 1, 64, 64)) < 0.7)
    causal_rows = tf.constant([[True], [False]])

    def attended(group_elements):
        with tf.GradientTape() as tape:
            tape.watch([qk, v])
            out = attend(qk, v, sort_order(buckets, valid, 4), valid,
                         ChunkSettings(bucket_size=8, group_elements=group_elements),
                         query_key_mask=mask, causal_rows=causal_rows)
            loss = tf.reduce_sum(out * tf.sin(out))
        return out, tape.gradient(loss, [qk, v])

    out_a, grads_a = attended(2**30)
    out_b, grads_b = attended(budget)
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # The flags matter: both rows under one rule give other outputs.
    same = attend(qk, v, sort_order(buckets, valid, 4), valid,
                  ChunkSettings(bucket_size=8, group_elements=budget),
                  query_key_mask=mask, causal_rows=tf.constant([[False]]))
    assert np.abs(same[0] - out_b[0]).max() > 1e-3
    np.testing.assert_allclose(same[1], out_b[1], atol=1e-5)


def test_group_size_divides_rows():
    assert group_size(12, 1024, 2048) == 2
    assert group_size(12, 1024, 10**9) == 12
    assert group_size(7, 1024, 4096) == 1  # prime: one at a time
    assert group_size(8, 10**9, 1) == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("budget", [2**30, 1024, 512, 256])
def test_gradient_with_dropout_matches_finite_differences(budget, causal):
    # Budgets: all at once; one row per loop iteration (2 rounds x 32 x 16
    # logits); one (row, round) per iteration; that a range of 2 of its 4
    # chunks at a time.
    # float64 all the way, so central differences are an independent
    # reference good to ~1e-9: the hand-written softmax backward, the
    # permutation gathers and the recomputing group loop must match. The
    # differences are taken along random directions (of qk alone, of v
    # alone): a wrong gradient entry moves every such directional derivative,
    # and 6 directions cost 12 passes where the whole Jacobian costs 1,024.
    qk, v, buckets, valid = problem(batch=1, heads=2, rounds=2, length=32, width=4)
    qk, v = tf.cast(qk, tf.float64), tf.cast(v, tf.float64)
    seed = tf.constant([3, 4], tf.int32)
    rng = np.random.default_rng(7)
    weights = tf.constant(rng.normal(size=(1, 2, 32)), tf.float64)

    @tf.function
    def f(qk, v):
        settings = ChunkSettings(bucket_size=8, causal=causal, dropout_rate=0.3,
                                 group_elements=budget)
        out = attend(qk, v, sort_order(buckets, valid, 4), valid, settings,
                     dropout_seed=seed)
        return tf.reduce_sum(weights * tf.reduce_sum(out * tf.cos(out), axis=-1))

    with tf.GradientTape() as tape:
        tape.watch([qk, v])
        loss = f(qk, v)
    grads = tape.gradient(loss, [qk, v])
    delta = 1e-6
    for which in range(2):
        for _ in range(3):
            step = [tf.zeros_like(qk), tf.zeros_like(v)]
            step[which] = tf.constant(rng.normal(size=qk.shape), tf.float64)
            plus = f(qk + delta * step[0], v + delta * step[1])
            minus = f(qk - delta * step[0], v - delta * step[1])
            numerical = float(plus - minus) / (2 * delta)
            theoretical = float(tf.reduce_sum(grads[which] * step[which]))
            scale = float(tf.norm(grads[which]) * tf.norm(step[which]))
            assert scale > 0
            assert abs(theoretical - numerical) <= 1e-6 * scale, (which, theoretical,
                                                                 numerical)


def test_dropout_masks_differ_across_groups_and_steps():
    # One (batch, head) row per group: with the seed of one step, the
    # groups' outputs must differ from one another's mask pattern, and a
    # second step's seed must give other masks than the first.
    qk, v, buckets, _ = problem(batch=1, heads=4, rounds=1, length=32, width=4)
    qk = tf.zeros_like(qk)  # uniform attention: only the mask shapes the output
    v = tf.ones_like(v)

    def dropped(seed):
        # 1 round x 32 x 16 logits: one (batch, head) row a group.
        settings = ChunkSettings(bucket_size=8, dropout_rate=0.5, group_elements=512)
        valid = tf.ones((1, 32), tf.bool)
        out = attend(qk, v, sort_order(tf.zeros_like(buckets), valid, 4), valid,
                     settings, dropout_seed=tf.constant(seed, tf.int32))
        return np.asarray(out)[0, :, :, 0]  # (heads, L): kept-probability mass

    first = dropped([7, 0])
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.allclose(first[a], first[b])
    for later in ([7, 1], [7, 2], [8, 0]):
        other = dropped(later)
        # `seed + [0, group]` made step [7, 1]'s group 0 replay step [7, 0]'s
        # group 1: no group of another step may repeat any group's mask.
        for a in range(4):
            for b in range(4):
                assert not np.allclose(first[a], other[b]), (later, a, b)
    np.testing.assert_array_equal(first, dropped([7, 0]))  # same seed, same masks


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_single_row_too_large_for_the_budget_is_looped(monkeypatch, rounds):
    # Batch 1 and one head (or heads taken one at a time): one row, which
    # must still be attended a (round, range of chunks) at a time.
    from keras_reformer.lsh import chunk_attention

    qk, v, buckets, valid = problem()
    qk, v, buckets, valid = qk[:1, :1], v[:1, :1], buckets[:1, :1, :rounds], valid[:1]
    looped = []
    loop_rounds = chunk_attention._loop_rounds
    monkeypatch.setattr(chunk_attention, "_loop_rounds",
                        lambda *args: looped.append(1) or loop_rounds(*args))
    out_a, grads_a = run(qk, v, buckets, valid, 2**30, causal=True)
    assert not looped
    out_b, grads_b = run(qk, v, buckets, valid, 128, causal=True)
    assert looped
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("before, after", [(1, 1), (2, 0)])
def test_ranges_with_a_wider_window_equal_single_pass(before, after):
    # Windows of 3 chunks: ranges of 2 chunks (a budget of 512 logits)
    # overlap their neighbours by 2, so each range's gradient is folded
    # into the next one's first 2 chunks (and, looking ahead, the last
    # range's reaches past the row).
    qk, v, buckets, valid = problem()
    kwargs = {"chunks_before": before, "chunks_after": after}
    out_a, grads_a = run(qk, v, buckets, valid, 2**30, **kwargs)
    out_b, grads_b = run(qk, v, buckets, valid, 512, **kwargs)
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
