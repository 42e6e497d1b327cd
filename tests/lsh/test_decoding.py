"""Cached one-token LSH decoding against the layer's full causal pass."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import LSHAttention
from keras_reformer.lsh import decoding as lsh_decode
from keras_reformer.ops import buffers

LENGTH = 70  # crosses 8 chunks of 8; with 2 buckets each bucket overflows its ring


def decode_errors(layer, x, lengths, prompt, jit=False):
    """Max |cached - full| over every decoded position of every row.

    Row b's prompt is its first lengths[b] positions (the rest of the
    `prompt`-long block is padding); then each row decodes its own next
    positions one token at a time, until LENGTH.
    """
    full = layer(x, use_causal_mask=True).numpy()
    batch = x.shape[0]
    valid = tf.constant(np.arange(prompt)[None] < np.asarray(lengths)[:, None])
    reach = layer.num_chunks_before * layer.bucket_size
    qk, v = layer.project(x[:, :prompt])
    buckets, total = layer.hash_buckets(qk)
    cache = lsh_decode.init_cache(qk, v, buckets, valid, total, reach, LENGTH)

    def step(cache, xt, position):
        q1, v1 = layer.project(xt)
        b1, _ = layer.hash_buckets(q1)
        out, cache = lsh_decode.decode_step(
            cache, q1[:, :, 0], v1[:, :, 0], b1[..., 0], position, reach,
            layer.sliding_window,
        )
        return layer.attend_output(out[:, :, None]), cache

    if jit:
        step = tf.function(step, jit_compile=True)
    position = np.array(lengths)
    errors = []
    while position.min() < LENGTH:
        index = np.minimum(position, LENGTH - 1)
        xt = tf.gather(x, index[:, None], batch_dims=1)
        y, cache = step(cache, xt, tf.constant(index, tf.int32))
        for b in range(batch):
            if position[b] < LENGTH:
                errors.append(np.abs(y.numpy()[b, 0] - full[b, position[b]]).max())
        position = position + 1
    return max(errors), len(errors)


@pytest.mark.parametrize("rounds", [1, 2, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_equals_full_pass(rounds, padded):
    layer = LSHAttention(num_heads=2, key_dim=16, bucket_size=8,
                         num_hashes=rounds, max_length=128, seed=1)
    x = tf.random.normal((2, LENGTH, 32), seed=0)
    lengths = [21, 13] if padded else [21, 21]
    error, count = decode_errors(layer, x, lengths, prompt=21)
    assert count == 2 * LENGTH - sum(lengths)
    assert error < 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_buckets=2),  # buckets far longer than the reach: rings wrap
        dict(num_buckets=(2, 4), num_chunks_before=2),  # factorized, reach 16
        dict(num_chunks_before=0),  # self only
        dict(num_buckets=2, sliding_window=5),
    ],
)
def test_cached_equals_full_pass_variants(kwargs):
    layer = LSHAttention(num_heads=2, key_dim=16, bucket_size=8, num_hashes=2,
                         max_length=128, seed=4, **kwargs)
    x = tf.random.normal((2, LENGTH, 32), seed=5)
    error, _ = decode_errors(layer, x, [17, 9], prompt=17)
    assert error < 1e-5


def test_one_token_prompt_and_jit():
    layer = LSHAttention(num_heads=2, key_dim=16, bucket_size=8, num_hashes=2,
                         num_buckets=4, max_length=128, seed=2)
    x = tf.random.normal((1, LENGTH, 32), seed=3)
    error, _ = decode_errors(layer, x, [1], prompt=1, jit=True)
    assert error < 1e-5


def test_ring_holds_most_recent_members():
    # Positions of bucket 0: 0, 2, 3, 5, 6 with ring size 3 -> the last three
    # (3, 5, 6) in slots n % 3 of their member numbers n = 2, 3, 4.
    buckets = tf.constant([[[[0, 1, 0, 0, 1, 0, 0, 1]]]], tf.int32)
    valid = tf.constant([[True] * 7 + [False]])
    qk = tf.random.normal((1, 1, 8, 4))
    cache = lsh_decode.init_cache(qk, qk, buckets, valid, 2, reach=3, max_length=10)
    np.testing.assert_array_equal(cache["count"].numpy()[0, 0, 0], [5, 2])
    np.testing.assert_array_equal(cache["ring"].numpy()[0, 0, 0, 0], [5, 6, 3])
    # bucket 1: members 1, 4 (position 7 is padding, never a key)
    np.testing.assert_array_equal(cache["ring"].numpy()[0, 0, 0, 1], [1, 4, -1])


def test_prompt_longer_than_cache_is_an_error():
    qk = tf.zeros((1, 1, 8, 4))
    with pytest.raises(ValueError, match="max_length"):
        lsh_decode.init_cache(qk, qk, tf.zeros((1, 1, 1, 8), tf.int32),
                              tf.ones((1, 8), bool), 2, 8, max_length=4)


@pytest.mark.parametrize("jit", [False, True], ids=["graph_in_place", "xla"])
def test_compiled_decode_loop_equals_full_pass(jit):
    # The whole decode as one compiled while_loop, the way generate() runs
    # it: graph mode overwrites the cache in place (ordered only by control
    # dependencies), XLA scatters after data-dependent reads. Both must still
    # read each step's window before writing its token.
    layer = LSHAttention(num_heads=2, key_dim=16, bucket_size=8, num_hashes=2,
                         num_buckets=4, max_length=128, seed=6)
    x = tf.random.normal((2, LENGTH, 32), seed=7)
    full = layer(x, use_causal_mask=True).numpy()
    lengths, prompt = [13, 5], 13
    reach = layer.num_chunks_before * layer.bucket_size
    valid = tf.constant(np.arange(prompt)[None] < np.asarray(lengths)[:, None])
    qk, v = layer.project(x[:, :prompt])
    buckets, total = layer.hash_buckets(qk)
    cache = lsh_decode.init_cache(qk, v, buckets, valid, total, reach, LENGTH)
    before = {k: t.numpy() for k, t in cache.items()}

    @tf.function(jit_compile=jit)
    def decode(cache, x):
        if not jit:
            cache = buffers.own(cache)
        position = tf.constant(lengths, tf.int32)

        def body(i, position, cache, outputs):
            at = tf.minimum(position, LENGTH - 1)
            xt = tf.gather(x, at[:, None], batch_dims=1)
            q1, v1 = layer.project(xt)
            b1, _ = layer.hash_buckets(q1)
            out, cache = lsh_decode.decode_step(
                cache, q1[:, :, 0], v1[:, :, 0], b1[..., 0], at, reach,
                in_place=not jit,
            )
            y = layer.attend_output(out[:, :, None])[:, 0]
            return i + 1, position + 1, cache, outputs.write(i, y)

        steps = LENGTH - min(lengths)
        outputs = tf.TensorArray(tf.float32, size=steps)
        _, _, _, outputs = tf.while_loop(
            lambda i, *_: i < steps, body, (0, position, cache, outputs))
        return outputs.stack()  # (steps, B, features)

    out = decode(cache, x).numpy()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[: LENGTH - n, b], full[b, n:], atol=1e-5)
    # The caller's cache is untouched: the loop overwrote its own copy.
    for k, t in cache.items():
        np.testing.assert_array_equal(t.numpy(), before[k])
