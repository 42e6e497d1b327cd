"""Byte tokenizer: exact UTF-8 bytes from core TF ops, no TF Text."""

import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from keras_reformer import text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tokenize_gives_python_utf8_bytes_for_every_rank():
    texts = ["héllo wörld", "", "日本", "\x00\x7f€𝄞"]
    want = [list(t.encode("utf-8")) for t in texts]
    ids = text.tokenize(tf.constant(texts))
    assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
    assert ids.to_list() == want
    scalar = text.tokenize(tf.constant(texts[0]))
    assert isinstance(scalar, tf.Tensor) and scalar.numpy().tolist() == want[0]
    grid = text.tokenize(tf.constant([texts[:2], texts[2:]]))
    assert grid.shape[:2] == [2, 2] and grid.to_list() == [want[:2], want[2:]]
    assert text.tokenize(tf.constant([], tf.string)).to_list() == []
    assert text.tokenize(tf.zeros([2, 0], tf.string)).to_list() == [[], []]


def test_tokenize_every_byte_value_including_invalid_utf8():
    raw = bytes(range(256)) * 2  # not valid UTF-8: bytes >= 128 stand alone
    assert text.tokenize(tf.constant(raw)).numpy().tolist() == list(raw)
    batch = text.tokenize(tf.constant([raw[:200], raw[200:]]))
    assert batch.to_list() == [list(raw[:200]), list(raw[200:])]


def test_tokenize_inside_tf_function_and_tf_data():
    fn = tf.function(text.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    assert fn(tf.constant(["é", "ab"])).to_list() == [[195, 169], [97, 98]]
    ds = tf.data.Dataset.from_tensor_slices(["añb", "c"]).map(text.tokenize)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == [[97, 195, 177, 98], [99]]


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match=r"`strings` must be a tf.string.*int32"):
        text.tokenize(tf.constant([1, 2]))


def test_detokenize_round_trip_and_errors():
    texts = ["héllo", "", "日本"]
    ids = text.tokenize(tf.constant(texts))
    assert [t.decode("utf-8") for t in text.detokenize(ids).numpy()] == texts
    # Cut inside a character: replaced, not an error.
    assert text.detokenize(ids[2][:4]).numpy().decode("utf-8") == "日\ufffd"
    with pytest.raises(tf.errors.InvalidArgumentError, match="< 256"):
        text.detokenize(tf.constant([[65, 300]]))


def test_tokenizing_never_loads_tf_text():
    # A fresh process: in this one another test may have imported it.
    code = textwrap.dedent("""
        import sys
        import tensorflow as tf
        from keras_reformer import text
        text.tokenize(tf.constant(["é"]))
        tf.data.Dataset.from_tensors("ab").map(text.tokenize).get_single_element()
        print("LOADED", "tensorflow_text" in sys.modules)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED False" in proc.stdout
