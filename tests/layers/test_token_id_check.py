"""TokenIdCheck: ids are checked in their own dtype, before the int32 cast."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import TokenIdCheck

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


@pytest.mark.parametrize("bad,phrase", BAD_IDS)
def test_bad_id_fails_in_eager_mode(bad, phrase):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        TokenIdCheck(VOCABULARY_SIZE)(int64_batch(bad))
    assert phrase in str(error.value)
    assert "vocabulary_size=10" in str(error.value)


@pytest.mark.parametrize("bad,phrase", BAD_IDS)
def test_bad_id_fails_in_tf_function(bad, phrase):
    layer = TokenIdCheck(VOCABULARY_SIZE)
    fn = tf.function(layer.__call__,
                     input_signature=[tf.TensorSpec([None, None], tf.int64)])
    np.testing.assert_array_equal(np.asarray(fn(int64_batch())), int64_batch())
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        fn(int64_batch(bad))
    assert phrase in str(error.value)
    assert "vocabulary_size=10" in str(error.value)


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
    with pytest.raises(ValueError, match=r"vocabulary_size.*Received: vocabulary_size="):
        TokenIdCheck(value)


def test_config_round_trip():
    layer = TokenIdCheck(1234, name="check")
    clone = TokenIdCheck.from_config(layer.get_config())
    assert clone.vocabulary_size == 1234
    with pytest.raises(tf.errors.InvalidArgumentError):
        clone(np.array([[1234]]))
