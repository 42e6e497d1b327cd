"""Out-of-range token ids fail clearly in every mode: eager, graph, XLA, mirrored.

Under XLA (`jit_compile=True`, Keras' default on GPU) the model's own
`TokenIdCheck` cannot fire (XLA drops assertions) and the embedding gather
clamps the id: the controls below show that hazard; the other tests show
that the checks before the compiled step catch it. MirroredStrategy needs
logical CPUs configured before any TensorFlow op, so that run happens in a
fresh process (`python tests/test_bad_ids.py mirrored` prints a JSON report).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
VOCAB, LENGTH, BATCH = 16, 32, 2
BAD_IDS = [VOCAB, -1]  # one past the end, and negative
BAD_AT = (1, 3)  # where the bad id goes: row 1, position 3
MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(jit_compile=False),
    "xla": dict(jit_compile=True),
}


def backbone():
    import keras_reformer as kr

    return kr.models.ReformerBackbone(
        VOCAB, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        bucket_size=16, max_sequence_length=LENGTH, seed=1,
    )


def reformer():
    """The language model (logits over the VOCAB ids) on `backbone()`."""
    import keras_reformer as kr

    return kr.models.ReformerCausalLM(backbone())


def compiled(model, **kwargs):
    import keras

    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), **kwargs)
    return model


def batch(bad=None):
    ids = np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH)).astype("int32")
    targets = np.roll(ids, -1, axis=1)
    if bad is not None:
        ids[BAD_AT] = bad
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, targets


def dataset(bad=None):
    import tensorflow as tf

    return tf.data.Dataset.from_tensors(batch(bad))


def assert_names_id(message, bad, at=BAD_AT):
    # The id, where it is, vocabulary_size and the allowed range.
    assert f"token_ids[{at[0]}, {at[1]}] = {bad}" in message, message
    assert f"vocabulary_size={VOCAB}" in message, message
    assert "allowed ids are [0, vocabulary_size)" in message, message


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def changed(before, model):
    return any(not np.array_equal(a, b) for a, b in zip(before, weights_of(model)))


# ------------------------------------------------------ single device


@pytest.fixture(scope="module", params=list(MODES))
def mode_model(request):
    return request.param, compiled(reformer(), **MODES[request.param])


@pytest.mark.parametrize("source", ["arrays", "dataset"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_fit_refuses_bad_id_in_every_mode(mode_model, bad, source):
    import tensorflow as tf

    mode, model = mode_model
    before = weights_of(model)
    data = dict(x=dataset(bad)) if source == "dataset" else dict(zip("xy", batch(bad)))
    # Arrays are checked before fit starts (ValueError); a dataset batch by
    # batch in tf.data (InvalidArgumentError from the iterator).
    error = ValueError if source == "arrays" else tf.errors.InvalidArgumentError
    with pytest.raises(error) as caught:
        model.fit(**data, epochs=1, verbose=0, shuffle=False)
    assert_names_id(str(caught.value), bad)
    assert not changed(before, model), f"{mode}: a step ran on the bad batch"


def test_valid_ids_train_in_every_mode(mode_model):
    mode, model = mode_model
    before = weights_of(model)
    history = model.fit(dataset(), epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0]), mode
    assert changed(before, model), f"{mode}: the valid batch did not train"


@pytest.mark.parametrize("method", ["evaluate", "predict", "train_on_batch",
                                    "test_on_batch", "predict_on_batch"])
def test_other_entry_points_refuse_bad_id_under_xla(method):
    model = compiled(reformer(), jit_compile=True)
    x, y = batch(VOCAB)
    args = (x,) if method.startswith("predict") else (x, y)
    kwargs = {"verbose": 0} if method in ("evaluate", "predict") else {}
    with pytest.raises(ValueError) as caught:
        getattr(model, method)(*args, **kwargs)
    assert_names_id(str(caught.value), VOCAB)


def batches_py_dataset(bad=None):
    import keras

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return batch(bad)

    return Batches()


@pytest.mark.parametrize("source", ["generator", "py_dataset", "validation_data"])
def test_other_sources_refuse_bad_id_under_xla(source):
    # (A validation dataset is wrapped like `x` above; its error would come
    # only after an XLA-compiled training epoch.) keras-hub's tasks take no
    # Python generators or PyDatasets (their `fit` turns `x` into a dataset
    # itself), so those two go to the backbone, whose `fit` is Keras' own.
    model = compiled(backbone() if source in ("generator", "py_dataset") else reformer(),
                     jit_compile=True)
    data = {
        "generator": dict(x=(b for b in [batch(-1)])),
        "py_dataset": dict(x=batches_py_dataset(-1)),
        "validation_data": dict(x=dataset(), validation_data=batch(-1)),
    }[source]
    with pytest.raises(ValueError) as caught:
        model.fit(**data, epochs=1, verbose=0, shuffle=False)
    assert_names_id(str(caught.value), -1)


def test_checked_py_dataset_still_trains():
    # The backbone: keras-hub's tasks take no PyDataset (see above).
    model = compiled(backbone(), run_eagerly=True)
    before = weights_of(model)
    model.fit(batches_py_dataset(), epochs=1, verbose=0)
    assert changed(before, model)


def test_predict_on_dataset_refuses_bad_id_under_xla():
    import tensorflow as tf

    model = compiled(reformer(), jit_compile=True)
    inputs_only = dataset(-1).map(lambda x, y: x)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        model.predict(inputs_only, verbose=0)
    assert_names_id(str(caught.value), -1)


def test_causal_lm_fit_refuses_bad_id_under_xla():
    import tensorflow as tf

    import keras_reformer as kr

    lm = kr.models.ReformerCausalLM(backbone())
    lm.compile(jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        lm.fit(dataset(VOCAB), epochs=1, verbose=0, shuffle=False)
    assert_names_id(str(caught.value), VOCAB)


# ----------------------------------------------- controls: the hazard


def test_control_xla_clamps_bad_ids_to_a_wrong_embedding_row():
    # What the checks guard against: inside XLA, TokenIdCheck cannot fail,
    # so id VOCAB reads row VOCAB - 1 (XLA clamps the gather) and so does -1
    # (keras.ops.take counts negative ids from the end, as numpy does).
    import keras
    import tensorflow as tf

    import keras_reformer as kr

    ids = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(VOCAB, 4)
    model = keras.Model(ids, embedding(kr.layers.TokenIdCheck(VOCAB)(ids)))
    table = np.array(embedding.embeddings)
    looked_up = tf.function(model, jit_compile=True)(np.array([[VOCAB, -1]], "int32"))
    np.testing.assert_array_equal(np.array(looked_up)[0], table[[VOCAB - 1, VOCAB - 1]])
    # Eagerly the same layer fails: the check itself works, XLA drops it.
    with pytest.raises(tf.errors.InvalidArgumentError):
        model(np.array([[VOCAB]], "int32"))


@pytest.mark.slow  # ~20 s of XLA compiling; the control above shows the hazard in 1 s
def test_control_without_the_input_check_xla_trains_on_bad_ids():
    # The same ReformerCausalLM's graph as a plain keras.Model (no input
    # check) trains on the bad batch under XLA without any error: the error
    # in the tests above comes from the check before the step, nothing else.
    import keras

    lm = reformer()
    plain = compiled(keras.Model(lm.input, lm.output), jit_compile=True)
    before = weights_of(plain)
    history = plain.fit(dataset(VOCAB), epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    assert changed(before, plain)


# ------------------------------------------------- MirroredStrategy


def run_mirrored():
    """Two logical CPUs; prepare_fit's XLA per-replica step. Returns a report."""
    import keras
    import tensorflow as tf

    from keras_reformer import distribute

    distribute.use_logical_cpus(2)
    strategy = tf.distribute.MirroredStrategy()
    report = {"replicas": strategy.num_replicas_in_sync}

    def fit(model, data):
        before = weights_of(model)
        try:
            history = model.fit(data, epochs=1, verbose=0, shuffle=False)
            return {"error": None, "loss": history.history["loss"][0],
                    "changed": changed(before, model)}
        except Exception as error:  # reported, judged by the test
            return {"error": type(error).__name__, "message": str(error),
                    "changed": changed(before, model)}

    with strategy.scope():
        model = compiled(reformer())
        distribute.prepare_fit(model, jit_compile=True)
        # A model that only contains a ReformerCausalLM: no input check of
        # its own, so what fails is prepare_fit's check in each replica's step.
        lm = reformer()
        ids = keras.Input((LENGTH,), dtype="int32")
        wrapper = compiled(keras.Model(ids, lm(
            {"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)})))
        distribute.prepare_fit(wrapper, jit_compile=True)
    ids_only = lambda bad: dataset(bad).map(lambda x, y: (x["token_ids"], y))  # noqa: E731
    for bad in BAD_IDS:
        report[f"model {bad}"] = fit(model, dataset(bad))
        report[f"wrapper {bad}"] = fit(wrapper, ids_only(bad))
    # A bad id after a good batch: a tf.data check's error was lost there.
    report["model later"] = fit(model, dataset().concatenate(dataset(VOCAB)))
    # Valid ids with XLA per replica: tests/test_distribute.py (the wrapper,
    # losses compared with a single-device run). Here the model's own route
    # (its checked dataset, distributed by Keras), without XLA's compile time.
    with strategy.scope():
        distribute.prepare_fit(model, jit_compile=False)
    report["model valid"] = fit(model, dataset())
    return report


@pytest.fixture(scope="module")
def mirrored():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, HERE, "mirrored"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one Mirrored training process for the module (35-100 s on 2 cores)
@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("kind", ["model", "wrapper"])
def test_mirrored_prepare_fit_refuses_bad_id(mirrored, kind, bad):
    assert mirrored["replicas"] == 2
    result = mirrored[f"{kind} {bad}"]
    assert result["error"] == "InvalidArgumentError", result
    # Both are checked in prepare_fit's step, which sees each replica's half
    # of the batch: the bad row is replica 1's row 0.
    assert_names_id(result["message"], bad, (0, BAD_AT[1]))
    # Every replica fails on the same all-reduced check (so none is left in
    # a gradient all-reduce that the runtime would abort for the process).
    assert "(in replica 1 of 2, whose part of the batch it indexes)" in result["message"]
    assert "CANCELLED" not in result["message"], result["message"]
    assert not result["changed"]


@pytest.mark.slow  # one Mirrored training process for the module (35-100 s on 2 cores)
def test_mirrored_prepare_fit_refuses_bad_id_in_a_later_batch(mirrored):
    # The model's own fit's tf.data check failed here without an error (the
    # multi-device iterator raised OutOfRange, the end of the data for fit).
    result = mirrored["model later"]
    assert result["error"] == "InvalidArgumentError", result
    assert_names_id(result["message"], VOCAB, (0, BAD_AT[1]))


@pytest.mark.slow  # one Mirrored training process for the module (35-100 s on 2 cores)
def test_mirrored_prepare_fit_trains_valid_ids(mirrored):
    # Run after the five bad-id fits in the same process: with a check in
    # one replica only, a replica waiting in the gradient all-reduce was
    # cancelled and TF aborted the process's collectives ("Restart your
    # program to reset"), so this fit failed with CancelledError (seen in
    # CI; whether it happened was a race).
    result = mirrored["model valid"]
    assert result["error"] is None, result
    assert np.isfinite(result["loss"]) and result["changed"]


if __name__ == "__main__":
    if sys.argv[1:] == ["mirrored"]:
        sys.path.insert(0, ROOT)
        print(json.dumps(run_mirrored()))
    else:
        sys.exit("usage: python tests/test_bad_ids.py mirrored")
