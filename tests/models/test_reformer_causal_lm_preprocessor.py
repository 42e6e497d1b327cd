"""ReformerTokenizer and ReformerCausalLMPreprocessor: keras-hub subclasses
whose ids are the UTF-8 bytes plus start (256) and end (257)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models.reformer_causal_lm_preprocessor import (
    ReformerCausalLMPreprocessor,
)
from keras_reformer.models.reformer_tokenizer import ReformerTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START, END = 256, 257
TEXTS = ["ab", "héllo wörld", "", "日本\x00€𝄞"]


def utf8(text):
    return list(text.encode("utf-8"))


def packed(text, length, start=True, end=True):
    """The reference packing, by hand: [start] + bytes cut to fit + [end],
    right-padded with 0; and its mask."""
    room = length - int(start) - int(end)
    ids = [START] * start + utf8(text)[:room] + [END] * end
    return ids + [0] * (length - len(ids)), [1] * len(ids) + [0] * (length - len(ids))


def training_reference(texts, sequence_length, start=True, end=True):
    rows = [packed(t, sequence_length + 1, start, end) for t in texts]
    ids = np.array([r[0] for r in rows])
    mask = np.array([r[1] for r in rows], bool)
    return ids[:, :-1], mask[:, :-1], ids[:, 1:], mask[:, 1:]


def assert_training_output(out, texts, sequence_length, start=True, end=True):
    x, y, w = out
    ids, mask, y_ref, w_ref = training_reference(texts, sequence_length, start, end)
    np.testing.assert_array_equal(np.asarray(x["token_ids"]), ids)
    np.testing.assert_array_equal(np.asarray(x["padding_mask"]), mask)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_array_equal(np.asarray(w), w_ref)
    assert x["token_ids"].dtype == "int32" and y.dtype == "int32"
    # keras-hub's dtype for both masks.
    assert x["padding_mask"].dtype == "bool" and w.dtype == "bool"


def op_types(*graphs):
    return {op.type for g in graphs for op in g.get_operations()}


# ------------------------------------------------------------ tokenizer


def test_tokenizer_ids_are_utf8_bytes_eager_traced_and_in_tf_data():
    tokenizer = ReformerTokenizer()
    want = [utf8(t) for t in TEXTS]
    assert [list(map(int, r)) for r in tokenizer(TEXTS)] == want
    assert np.asarray(tokenizer(TEXTS[1])).tolist() == want[1]
    traced = tf.function(tokenizer)
    assert traced(tf.constant(TEXTS)).to_list() == want
    assert traced(tf.constant(TEXTS[3])).numpy().tolist() == want[3]
    ds = tf.data.Dataset.from_tensor_slices(TEXTS)
    assert [x.tolist() for x in ds.map(tokenizer).as_numpy_iterator()] == want
    assert ds.batch(4).map(tokenizer).get_single_element().to_list() == want
    # Every byte value, also invalid UTF-8, and no case folding.
    raw = bytes(range(256)) + "ÀB".encode()
    assert np.asarray(tokenizer(raw)).tolist() == list(raw)
    assert traced(tf.constant(raw)).numpy().tolist() == list(raw)


def test_tokenizer_sequence_length_gives_dense_ids():
    tokenizer = ReformerTokenizer(sequence_length=4)
    want = [(utf8(t) + [0] * 4)[:4] for t in TEXTS]
    np.testing.assert_array_equal(tokenizer(TEXTS), want)
    np.testing.assert_array_equal(tf.function(tokenizer)(tf.constant(TEXTS)), want)
    one = tf.function(tokenizer)(tf.constant("é"))
    assert one.shape == [4] and one.numpy().tolist() == [195, 169, 0, 0]


def test_tokenizer_special_tokens_and_vocabulary():
    tokenizer = ReformerTokenizer()
    assert tokenizer.vocabulary_size() == 258
    assert (tokenizer.start_token_id, tokenizer.end_token_id) == (256, 257)
    assert tokenizer.pad_token_id == 0
    assert sorted(tokenizer.special_token_ids) == [256, 257]
    assert sorted(tokenizer.special_tokens) == ["</s>", "<s>"]
    assert tokenizer.token_to_id("<s>") == 256 and tokenizer.id_to_token(257) == "</s>"
    assert tokenizer.token_to_id("a") == 97 and tokenizer.id_to_token(97) == "a"
    vocabulary = tokenizer.get_vocabulary()
    assert len(vocabulary) == 258 and sorted(vocabulary.values()) == list(range(258))
    with pytest.raises(ValueError, match="token='ab'"):
        tokenizer.token_to_id("ab")
    assert isinstance(tokenizer, keras_hub.tokenizers.ByteTokenizer)


def test_tokenizer_detokenize_drops_special_ids_and_keeps_byte_zero():
    tokenizer = ReformerTokenizer()
    rows = [[START] + utf8(t) + [END] for t in TEXTS]
    traced = tf.function(tokenizer.detokenize)
    assert tokenizer.detokenize(rows) == TEXTS
    assert tokenizer.detokenize(rows[3]) == TEXTS[3]
    got = traced(tf.ragged.constant(rows)).numpy().tolist()
    assert [s.decode("utf-8") for s in got] == TEXTS
    assert traced(tf.constant(rows[1])).numpy().decode("utf-8") == TEXTS[1]
    # Invalid UTF-8 becomes U+FFFD on both paths.
    assert tokenizer.detokenize([104, 255, 105]) == "h\ufffdi"
    assert traced(tf.constant([104, 255, 105])).numpy().decode() == "h\ufffdi"
    with pytest.raises(ValueError, match="0..255"):
        tokenizer.detokenize([65, 300])
    with pytest.raises(tf.errors.InvalidArgumentError, match="256"):
        traced(tf.constant([65, 300]))


def test_byte_offset_two_is_tensor2tensors_byte_layout():
    # Reference: enwik8's model card, ids = UTF-8 bytes + 2; 0 and 1 special.
    tokenizer = ReformerTokenizer(byte_offset=2)
    want = [[b + 2 for b in utf8(t)] for t in TEXTS]
    assert [list(map(int, r)) for r in tokenizer(TEXTS)] == want
    assert np.asarray(tokenizer(TEXTS[1])).tolist() == want[1]
    traced = tf.function(tokenizer)
    assert traced(tf.constant(TEXTS)).to_list() == want
    ds = tf.data.Dataset.from_tensor_slices(TEXTS)
    assert [x.tolist() for x in ds.map(tokenizer).as_numpy_iterator()] == want
    # Padding is 0 after the shift, on both paths; byte 0 is id 2.
    dense = ReformerTokenizer(sequence_length=5, byte_offset=2)
    padded = [(w + [0] * 5)[:5] for w in want]
    np.testing.assert_array_equal(dense(TEXTS), padded)
    np.testing.assert_array_equal(tf.function(dense)(tf.constant(TEXTS)), padded)
    assert np.asarray(dense("x")).tolist() == [ord("x") + 2, 0, 0, 0, 0]
    # Special tokens and vocabulary: <pad> 0, </s> 1, no start token.
    assert tokenizer.vocabulary_size() == 258
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id) == (
        None, 1, 0)
    assert sorted(tokenizer.special_token_ids) == [0, 1]
    assert tokenizer.token_to_id("a") == 99 and tokenizer.id_to_token(99) == "a"
    assert tokenizer.id_to_token(0) == "<pad>" and tokenizer.token_to_id("</s>") == 1
    vocabulary = tokenizer.get_vocabulary()
    assert sorted(vocabulary.values()) == list(range(258))
    # Detokenizing drops 0 and 1 and keeps byte 0 (id 2), on both paths.
    rows = [w + [1, 0] for w in want]
    assert tokenizer.detokenize(rows) == TEXTS
    got = tf.function(tokenizer.detokenize)(tf.ragged.constant(rows)).numpy().tolist()
    assert [g.decode() for g in got] == TEXTS
    with pytest.raises(ValueError, match=r"2..257.*\[258\]"):
        tokenizer.detokenize([65, 258])
    revived = ReformerTokenizer.from_config(tokenizer.get_config())
    assert revived.byte_offset == 2 and revived("hi").tolist() == [106, 107]
    with pytest.raises(ValueError, match=r"byte_offset.*\[0, 2\].*byte_offset=1"):
        ReformerTokenizer(byte_offset=1)


def test_preprocessor_without_a_start_token():
    tokenizer = ReformerTokenizer(byte_offset=2)
    with pytest.raises(ValueError, match="start_token_id.*add_start_token=False"):
        ReformerCausalLMPreprocessor(tokenizer)
    pre = ReformerCausalLMPreprocessor(tokenizer, sequence_length=6, add_start_token=False)
    x, y, w = pre(["abc"])
    ids = [b + 2 for b in utf8("abc")] + [1, 0, 0, 0]
    np.testing.assert_array_equal(x["token_ids"][0], ids[:6])
    np.testing.assert_array_equal(y[0], ids[1:7])
    prompt = pre.generate_preprocess(["abc"])
    np.testing.assert_array_equal(prompt["token_ids"][0], ids[:3] + [0, 0, 0])
    assert pre.generate_postprocess(prompt) == ["abc"]


def test_tokenizer_rejects_bad_arguments():
    tokenizer = ReformerTokenizer()
    with pytest.raises(TypeError, match=r"`inputs` must be .*inputs=\[1, 2\]"):
        tokenizer([1, 2])
    with pytest.raises(TypeError, match=r"`inputs`.*dtype=int32"):
        tokenizer(tf.constant([1, 2]))
    with pytest.raises(ValueError, match="fixes `lowercase`.*lowercase=True"):
        ReformerTokenizer(lowercase=True)
    with pytest.raises(ValueError, match="sequence_length=0"):
        ReformerTokenizer(sequence_length=0)


def test_tokenizer_config_serialization_and_preset(tmp_path):
    tokenizer = ReformerTokenizer(sequence_length=9)
    config = tokenizer.get_config()
    assert config["sequence_length"] == 9
    assert not {"lowercase", "errors"} & set(config)
    revived = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(tokenizer))))
    assert isinstance(revived, ReformerTokenizer)
    assert revived.get_config() == config
    tokenizer.save_to_preset(str(tmp_path))
    loaded = ReformerTokenizer.from_preset(str(tmp_path))
    assert isinstance(loaded, ReformerTokenizer) and loaded.get_config() == config


# --------------------------------------------------------- preprocessor


def test_preprocessor_packs_and_shifts_like_the_reference():
    pre = ReformerCausalLMPreprocessor(sequence_length=6)
    assert_training_output(pre(TEXTS), TEXTS, 6)
    # Cut: the special tokens always fit.
    assert_training_output(pre(["abcdefghij"]), ["abcdefghij"], 6)
    x, y, w = pre(TEXTS[1])  # one string
    ids, mask, y_ref, w_ref = training_reference(TEXTS[1:2], 6)
    np.testing.assert_array_equal(x["token_ids"], ids[0])
    np.testing.assert_array_equal(x["padding_mask"], mask[0])
    np.testing.assert_array_equal(y, y_ref[0])
    # A call-time sequence_length.
    assert_training_output(pre(TEXTS, sequence_length=3), TEXTS, 3)


@pytest.mark.parametrize("start,end", [(False, True), (True, False), (False, False)])
def test_preprocessor_start_and_end_flags(start, end):
    pre = ReformerCausalLMPreprocessor(sequence_length=5, add_start_token=start,
                                       add_end_token=end)
    assert_training_output(pre(TEXTS), TEXTS, 5, start, end)


def test_preprocessor_in_tf_data_and_tf_function_equals_eager():
    pre = ReformerCausalLMPreprocessor(sequence_length=8)
    ds = tf.data.Dataset.from_tensor_slices(TEXTS)
    assert_training_output(ds.batch(4).map(pre).get_single_element(), TEXTS, 8)
    unbatched = ds.map(pre, num_parallel_calls=tf.data.AUTOTUNE).batch(4)
    assert_training_output(unbatched.get_single_element(), TEXTS, 8)
    traced = tf.function(pre)
    assert_training_output(traced(tf.constant(TEXTS)), TEXTS, 8)


def test_preprocessor_attributes_come_from_the_tokenizer():
    pre = ReformerCausalLMPreprocessor(sequence_length=7, add_end_token=False)
    assert isinstance(pre, keras_hub.models.CausalLMPreprocessor)
    assert isinstance(pre.tokenizer, ReformerTokenizer)
    assert ReformerCausalLMPreprocessor.tokenizer_cls is ReformerTokenizer
    assert (pre.sequence_length, pre.add_start_token, pre.add_end_token) == (7, True, False)
    assert (pre.start_token_id, pre.end_token_id, pre.pad_token_id) == (256, 257, 0)
    assert pre.vocabulary_size == 258
    with pytest.raises(AttributeError):
        pre.start_token_id = 3
    tokenizer = ReformerTokenizer()
    assert ReformerCausalLMPreprocessor(tokenizer).tokenizer is tokenizer


def test_generate_preprocess_and_postprocess():
    pre = ReformerCausalLMPreprocessor(sequence_length=16)
    prompts = ["def main(", "héllo"]
    out = pre.generate_preprocess(prompts, sequence_length=12)
    want = [packed(p, 12, end=False) for p in prompts]
    np.testing.assert_array_equal(out["token_ids"], [w[0] for w in want])
    np.testing.assert_array_equal(out["padding_mask"], np.array([w[1] for w in want], bool))
    assert pre.generate_preprocess(prompts)["token_ids"].shape == (2, 16)
    assert pre.generate_postprocess(out) == prompts
    one = pre.generate_preprocess("héllo", sequence_length=12)
    assert pre.generate_postprocess(one) == "héllo"
    # Generated ids after an end token, padding after it (masked), int32 mask.
    ids = [[START] + utf8("ok") + [END, 104, 0], [START] + utf8("\x00é") + [0, 0]]
    mask = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    result = {"token_ids": np.array(ids, np.int32), "padding_mask": np.array(mask, np.int32)}
    assert pre.generate_postprocess(result) == ["okh", "\x00é"]
    as_lists = {k: v.tolist() for k, v in result.items()}
    assert pre.generate_postprocess(as_lists) == ["okh", "\x00é"]
    as_bool = {**result, "padding_mask": result["padding_mask"].astype(bool)}
    assert pre.generate_postprocess(as_bool) == ["okh", "\x00é"]
    as_tensors = {k: tf.constant(v) for k, v in result.items()}
    assert pre.generate_postprocess(as_tensors) == ["okh", "\x00é"]


def test_generate_postprocess_traced_over_int32_uses_core_ops_only():
    pre = ReformerCausalLMPreprocessor(sequence_length=16)
    spec = tf.TensorSpec([None, None], tf.int32)
    post = tf.function(pre.generate_postprocess).get_concrete_function(
        {"token_ids": spec, "padding_mask": spec})
    ids = [[START] + utf8("héllo") + [END, 5], [START, 120, 0, 0, 0, 0, 0, 0, 0]]
    mask = [[1] * 8 + [0], [1, 1, 1] + [0] * 6]
    got = post({"token_ids": tf.constant(ids), "padding_mask": tf.constant(mask)})
    assert [s.decode("utf-8") for s in got.numpy().tolist()] == ["héllo", "x\x00"]
    train = tf.function(pre).get_concrete_function(tf.TensorSpec([None], tf.string))
    prompt = tf.function(pre.generate_preprocess).get_concrete_function(
        tf.TensorSpec([None], tf.string))
    types = op_types(post.graph, train.graph, prompt.graph)
    # Ops of extension libraries (tensorflow_text) are not in tf.raw_ops.
    assert all(hasattr(tf.raw_ops, t) for t in types), sorted(
        t for t in types if not hasattr(tf.raw_ops, t))
    assert not {"ByteSplitWithOffsets", "CaseFoldUTF8", "NormalizeUTF8"} & types
    assert {"DecodeRaw", "UnicodeTranscode"} <= types


def test_runs_without_tensorflow_text():
    # A fresh process where `import tensorflow_text` fails, as on a server
    # with stock TensorFlow only.
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow_text"] = None
        import tensorflow as tf
        from keras_reformer.models.reformer_causal_lm_preprocessor import (
            ReformerCausalLMPreprocessor)
        pre = ReformerCausalLMPreprocessor(sequence_length=8)
        ds = tf.data.Dataset.from_tensor_slices(["é", "ab"]).batch(2).map(pre)
        x, y, w = ds.get_single_element()
        post = tf.function(pre.generate_postprocess)(
            {"token_ids": tf.cast(x["token_ids"], tf.int32),
             "padding_mask": tf.cast(x["padding_mask"], tf.int32)})
        print("RESULT", x["token_ids"].numpy().tolist(), post.numpy().tolist())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_ids = [[START, 195, 169, END, 0, 0, 0, 0], [START, 97, 98, END, 0, 0, 0, 0]]
    want_text = ["é".encode(), b"ab"]
    assert f"RESULT {want_ids} {want_text}" in proc.stdout


def test_bad_arguments_name_the_argument_and_value():
    pre = ReformerCausalLMPreprocessor(sequence_length=8)
    with pytest.raises(TypeError, match=r"`x` must be .*x=\[1, 2\]"):
        pre([1, 2])
    with pytest.raises(TypeError, match=r"`x`.*dtype=int32"):
        pre(tf.constant([[1, 2]]))
    with pytest.raises(TypeError, match=r"`x` must be .*x=3"):
        pre.generate_preprocess(3)
    with pytest.raises(ValueError, match=r"rank <= 1.*Received rank 2"):
        pre([["a", "b"]])
    with pytest.raises(ValueError, match=r"Received rank 2"):
        pre(tf.constant([["a"]]))
    with pytest.raises(ValueError, match=r"Received rank 2"):
        tf.data.Dataset.from_tensors([["a"]]).map(pre)
    for bad in (0, -3, 2.5, True, "8", None):
        with pytest.raises(ValueError, match=f"sequence_length={bad!r}"):
            ReformerCausalLMPreprocessor(sequence_length=bad)
    with pytest.raises(ValueError, match="sequence_length=0"):
        pre(["a"], sequence_length=0)
    with pytest.raises(ValueError, match="sequence_length=-1"):
        pre.generate_preprocess(["a"], sequence_length=-1)
    with pytest.raises(ValueError, match="sequence_length=0"):
        pre.sequence_length = 0
    # Constructor arguments of the wrong type are ValueErrors, as in Keras.
    with pytest.raises(ValueError, match=r"`tokenizer` must be .*tokenizer=16"):
        ReformerCausalLMPreprocessor(16)
    with pytest.raises(ValueError, match="add_end_token='no'"):
        ReformerCausalLMPreprocessor(add_end_token="no")
    with pytest.raises(ValueError, match="makes the labels itself"):
        pre(["a"], y=["b"])
    with pytest.raises(ValueError, match="'token_ids' and 'padding_mask'"):
        pre.generate_postprocess([[256, 97]])


def test_config_and_keras_serialization_round_trip():
    pre = ReformerCausalLMPreprocessor(ReformerTokenizer(), sequence_length=11,
                                       add_start_token=False, name="pre")
    config = pre.get_config()
    assert {k: config[k] for k in ("sequence_length", "add_start_token", "add_end_token")} \
        == {"sequence_length": 11, "add_start_token": False, "add_end_token": True}
    assert config["tokenizer"]["class_name"] == "ReformerTokenizer"
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(pre)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is ReformerCausalLMPreprocessor
    assert isinstance(revived.tokenizer, ReformerTokenizer)
    assert revived.get_config() == config
    assert_training_output(revived(TEXTS), TEXTS, 11, start=False)


def test_preset_round_trip(tmp_path):
    pre = ReformerCausalLMPreprocessor(sequence_length=13, add_end_token=False)
    preset = str(tmp_path / "preset")
    pre.save_to_preset(preset)
    assert {"preprocessor.json", "tokenizer.json"} <= set(os.listdir(preset))
    loaded = ReformerCausalLMPreprocessor.from_preset(preset)
    assert type(loaded) is ReformerCausalLMPreprocessor
    assert loaded.get_config() == pre.get_config()
    assert loaded.tokenizer.get_config() == pre.tokenizer.get_config()
    assert_training_output(loaded(TEXTS), TEXTS, 13, end=False)
    shorter = ReformerCausalLMPreprocessor.from_preset(preset, sequence_length=4)
    assert shorter.sequence_length == 4
    with pytest.raises(ValueError, match="neither config.json nor preprocessor.json"):
        ReformerCausalLMPreprocessor.from_preset(str(tmp_path))


def test_full_preset_finds_the_reformer_classes_from_the_backbone(tmp_path):
    # keras-hub's loaders pick the subclass whose `backbone_cls` is the
    # preset's backbone class; only `config.json`'s class name is read.
    preset = str(tmp_path)
    ReformerCausalLMPreprocessor(sequence_length=5).save_to_preset(preset)
    with open(os.path.join(preset, "config.json"), "w") as f:
        json.dump({"module": "keras_reformer.models.reformer_backbone",
                   "class_name": "ReformerBackbone", "config": {},
                   "registered_name": "keras_reformer>ReformerBackbone"}, f)
    pre = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    assert type(pre) is ReformerCausalLMPreprocessor and pre.sequence_length == 5
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(preset)
    assert type(tokenizer) is ReformerTokenizer
