"""TokenIdCheck: ids are checked in their own dtype, before the int32 cast."""

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import TokenIdCheck
from keras_reformer._token_ids import assert_token_ids, check_token_ids_numpy

VOCABULARY_SIZE = 10

# (ids, a phrase the error must contain): each id is out of range only in
# its own dtype for 2**32 + 5, which int32 wraps to 5.
BAD_IDS = [
    (2**32 + 5, "must be < vocabulary_size=10"),
    (-1, "must be >= 0"),
    (VOCABULARY_SIZE, "must be < vocabulary_size=10"),
]


def int64_batch(bad=None):
    ids = np.array([[0, 3, 9], [1, 2, 4]], dtype=np.int64)
    if bad is not None:
        ids[1, 1] = bad
    return ids


def test_int32_wrap_is_what_the_check_must_catch():
    # The reason for checking before casting: this id looks valid as int32.
    wrapped = int(tf.cast(tf.constant(2**32 + 5, tf.int64), tf.int32))
    assert 0 <= wrapped < VOCABULARY_SIZE


def test_valid_batch_passes_unchanged_as_int32():
    ids = int64_batch()
    out = TokenIdCheck(VOCABULARY_SIZE)(ids)
    assert out.dtype == tf.int32
    np.testing.assert_array_equal(np.asarray(out), ids.astype(np.int32))


def expected_message(bad, phrase):
    # The bad id and where it is (int64_batch puts it at [1, 1]), the
    # vocabulary size and the allowed range.
    return (f"token ids {phrase}: allowed ids are "
            f"[0, vocabulary_size) with vocabulary_size=10. Received: "
            f"token_ids[1, 1] = {bad}")


@pytest.mark.parametrize("bad,phrase", BAD_IDS)
def test_bad_id_fails_in_eager_mode(bad, phrase):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        TokenIdCheck(VOCABULARY_SIZE)(int64_batch(bad))
    assert expected_message(bad, phrase) in str(error.value)


@pytest.mark.parametrize("bad,phrase", BAD_IDS)
def test_numpy_check_gives_the_same_message_as_a_value_error(bad, phrase):
    with pytest.raises(ValueError) as error:
        check_token_ids_numpy(int64_batch(bad), VOCABULARY_SIZE)
    assert str(error.value) == expected_message(bad, phrase)
    np.testing.assert_array_equal(
        check_token_ids_numpy(int64_batch(), VOCABULARY_SIZE), int64_batch())


def test_first_bad_id_in_row_major_order_is_named():
    ids = int64_batch()
    ids[0, 2], ids[1, 0] = -7, 12
    with pytest.raises(ValueError, match=r"token_ids\[0, 2\] = -7"):
        check_token_ids_numpy(ids, VOCABULARY_SIZE)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"token_ids\[0, 2\] = -7"):
        assert_token_ids(ids, VOCABULARY_SIZE)


@pytest.mark.parametrize("bad,phrase", BAD_IDS)
def test_bad_id_fails_in_tf_function(bad, phrase):
    layer = TokenIdCheck(VOCABULARY_SIZE)
    fn = tf.function(layer.__call__,
                     input_signature=[tf.TensorSpec([None, None], tf.int64)])
    np.testing.assert_array_equal(np.asarray(fn(int64_batch())), int64_batch())
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        fn(int64_batch(bad))
    assert expected_message(bad, phrase) in str(error.value)


def test_under_xla_the_layer_only_casts():
    # XLA would drop the assertion (and cannot compile its message's string
    # ops), so the layer leaves it out there; the models check their inputs
    # before the compiled step instead (tests/test_bad_ids.py).
    layer = TokenIdCheck(VOCABULARY_SIZE)
    fn = tf.function(layer.__call__, jit_compile=True)
    out = fn(int64_batch(VOCABULARY_SIZE))
    assert out.dtype == tf.int32 and int(out[1, 1]) == VOCABULARY_SIZE


def test_narrow_dtype_below_vocabulary_size():
    # uint8 ids can never reach 300; casting 300 down to uint8 would give 44
    # and refuse valid ids.
    ids = np.array([[0, 100, 255]], dtype=np.uint8)
    out = TokenIdCheck(300)(ids)
    np.testing.assert_array_equal(np.asarray(out), ids.astype(np.int32))


def test_float_ids_refused():
    with pytest.raises(TypeError, match="integer token ids.*float32"):
        TokenIdCheck(VOCABULARY_SIZE)(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("value", [0, -3, 2.5, "10", None, True, 2**31 + 1])
def test_bad_vocabulary_size(value):
    with pytest.raises(ValueError, match=r"`vocabulary_size` must be .*Received: "
                                         rf"vocabulary_size={re.escape(repr(value))}$"):
        TokenIdCheck(value)


def test_largest_vocabulary_size_is_allowed():
    # Every id below 2**31 fits the int32 output.
    assert TokenIdCheck(2**31).vocabulary_size == 2**31


def test_config_round_trip():
    layer = TokenIdCheck(1234, name="check")
    clone = TokenIdCheck.from_config(layer.get_config())
    assert clone.vocabulary_size == 1234
    with pytest.raises(tf.errors.InvalidArgumentError):
        clone(np.array([[1234]]))
