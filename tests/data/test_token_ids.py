"""Token-id checks in tf.data: data.check_token_ids and lm_dataset(vocabulary_size=)."""

import doctest

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import data
from keras_reformer.data import token_ids

VOCAB = 10


def ids(bad=None):
    values = np.arange(8, dtype=np.int32).reshape(2, 4)
    if bad is not None:
        values[1, 2] = bad
    return values


def elements(bad=None):
    """The element shapes Keras reads: x, (x,), (x, y), (x, y, sample_weight)."""
    x = {"token_ids": ids(bad), "padding_mask": np.ones((2, 4), np.int32)}
    y = np.zeros((2, 4), np.int32)
    return {
        "ids alone": ids(bad),
        "dict alone": x,
        "(x,)": (x,),
        "(x, y)": (x, y),
        "(x, y, sample_weight)": (x, y, np.ones((2, 4), np.float32)),
    }


def as_dataset(element):
    return tf.data.Dataset.from_tensors(element)


@pytest.mark.parametrize("kind", list(elements()))
@pytest.mark.parametrize("bad", [VOCAB, -1, 2**31 - 1])
def test_bad_id_fails_while_iterating(kind, bad):
    ds = data.check_token_ids(as_dataset(elements(bad)[kind]), VOCAB)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        next(iter(ds))
    message = str(error.value)
    assert f"token_ids[1, 2] = {bad}" in message
    assert "allowed ids are [0, vocabulary_size) with vocabulary_size=10" in message


@pytest.mark.parametrize("kind", list(elements()))
def test_valid_elements_pass_unchanged(kind):
    element = elements()[kind]
    got = next(iter(data.check_token_ids(as_dataset(element), VOCAB)))
    tf.nest.assert_same_structure(got, element)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(element)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_custom_key():
    ds = as_dataset({"ids": ids(VOCAB)})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ids\[1, 2\] = 10"):
        next(iter(data.check_token_ids(ds, VOCAB, key="ids")))


@pytest.mark.parametrize("dataset,vocabulary_size,match", [
    ([[1, 2]], VOCAB, r"must be a tf.data.Dataset. Received: dataset=\[\[1, 2\]\]"),
    (as_dataset(ids()), 0, "Received: vocabulary_size=0"),
    (as_dataset({"other": ids()}), VOCAB, "must hold integer token ids"),
    (as_dataset(np.zeros((2, 4), np.float32)), VOCAB, "must hold integer token ids"),
])
def test_bad_arguments(dataset, vocabulary_size, match):
    with pytest.raises(ValueError, match=match):
        data.check_token_ids(dataset, vocabulary_size)


def test_numpy_elements_are_checked_at_once():
    # What the models use for arrays and generator batches: a ValueError now.
    with pytest.raises(ValueError, match=r"token_ids\[1, 2\] = -1"):
        token_ids.check_element(elements(-1)["(x, y)"], VOCAB)
    same = elements()["(x, y)"]
    assert token_ids.check_element(same, VOCAB) is same


@pytest.fixture
def ascii_files(tmp_path):
    paths = []
    for name, text in (("a.txt", b"abc xyz\n" * 8), ("b.txt", b"0123\n" * 8)):
        (tmp_path / name).write_bytes(text)
        paths.append(str(tmp_path / name))
    return paths


def test_lm_dataset_checks_bytes_against_a_smaller_vocabulary(ascii_files):
    # 'a' is byte 97: a model with 97 ids cannot embed it.
    ds = data.lm_dataset(ascii_files, 8, 2, shuffle=False, vocabulary_size=97)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        next(iter(ds))
    assert "byte_ids[0] = 97" in str(error.value)
    assert "vocabulary_size=97" in str(error.value)


def test_lm_dataset_with_a_large_enough_vocabulary_is_unchanged(ascii_files):
    kwargs = dict(files=ascii_files, seq_len=8, batch_size=2, shuffle=False, repeat=False)
    checked = list(data.lm_dataset(**kwargs, vocabulary_size=256))
    plain = list(data.lm_dataset(**kwargs))
    assert len(checked) == len(plain) > 0
    for (x1, y1), (x2, y2) in zip(checked, plain):
        np.testing.assert_array_equal(x1["token_ids"], x2["token_ids"])
        np.testing.assert_array_equal(y1, y2)


def test_lm_dataset_bad_vocabulary_size(ascii_files):
    with pytest.raises(ValueError, match="Received: vocabulary_size=0"):
        data.lm_dataset(ascii_files, 8, 2, vocabulary_size=0)


def test_docstring_examples_run():
    result = doctest.testmod(token_ids, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
