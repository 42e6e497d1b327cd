"""keras_reformer.distribute: XLA per replica in `fit` under MirroredStrategy.

Logical CPUs must be configured before any TensorFlow op, which the pytest
process may already have run, so the distributed runs happen in a fresh
process: this file run as a script (`python tests/test_distribute.py
mirrored`) prints a JSON report that the tests check.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH, LENGTH, VOCAB, STEPS = 4, 64, 32, 3


# ----------------------------------------------------------------- the runs


def make_model(distribute_module, strategy, jit_compile, initial=None, stacked=False):
    """A functional model around a ReformerCausalLM, compiled and prepared.

    The `XlaWitness` layer adds fixed noise from `tf.random.stateless_normal`,
    whose numbers differ with and without XLA (tensorflow#121243): distributed
    losses can only match the XLA reference if each replica ran XLA too.
    """
    import keras
    import tensorflow as tf

    import keras_reformer as kr

    class XlaWitness(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True  # passes the LM's mask on

        def call(self, logits):
            # (length, vocab): the same on every replica and every batch row.
            noise = tf.random.stateless_normal(tf.shape(logits)[1:], seed=[7, 7])
            return logits + noise

    with strategy.scope():
        ids = keras.Input((LENGTH,), dtype="int32")
        lm = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
            vocabulary_size=VOCAB, num_layers=2 if stacked else 1, hidden_dim=16,
            num_heads=2, intermediate_dim=32, bucket_size=16,
            max_sequence_length=LENGTH, dropout=0.0, causal=True, seed=3,
            stack_weights=stacked,
        ))
        logits = lm({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)})
        model = keras.Model(ids, XlaWitness()(logits))
        if initial is not None:
            model.set_weights(initial)
        model.compile(
            # epsilon: a tiny second moment would turn float noise into steps.
            keras.optimizers.Adam(1e-2, epsilon=1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        distribute_module.prepare_fit(model, jit_compile=jit_compile)
    return model


def train(model, strategy):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (GLOBAL_BATCH * STEPS, LENGTH)).astype("int32")
    y = np.roll(x, -1, axis=1)
    # Seeded shuffle: each new iterator gets the next permutation, so losses
    # match only if fit opens as many iterators under a strategy as on one
    # device (Keras' symbolic build under a strategy opened one more).
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
    dataset = dataset.batch(GLOBAL_BATCH)
    losses = []
    log = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model.fit(dataset, epochs=1, callbacks=[log], verbose=0, shuffle=False)
    return losses


def run_mirrored(jit_compile, stacked=False):
    import tensorflow as tf

    from keras_reformer import distribute

    import keras

    distribute.use_logical_cpus(2)
    # The same initial weights in the XLA and the graph process, so their
    # first losses differ only by what XLA changes (the witness's noise).
    keras.utils.set_random_seed(0)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    default = tf.distribute.get_strategy()
    reference = make_model(distribute, default, jit_compile, stacked=stacked)
    initial = reference.get_weights()
    model = make_model(distribute, mirrored, jit_compile, initial, stacked=stacked)
    report = {
        "replicas": mirrored.num_replicas_in_sync,
        "copies_per_weight": distribute.replica_copies(model),
        "outer_jit_compile": model.jit_compile,
        "reference_jit_compile": reference.jit_compile,
        "reference_losses": train(reference, default),
        "losses": train(model, mirrored),
        "replicas_identical": distribute.replicas_identical(model),
    }
    diffs = [np.abs(a - b).max() for a, b in zip(reference.get_weights(), model.get_weights())]
    moved = [np.abs(a - b).max() for a, b in zip(initial, model.get_weights())]
    report["weights_max_diff"] = float(max(diffs))
    report["weights_max_change"] = float(max(moved))
    report["initial_checksum"] = float(sum(np.abs(w).sum() for w in initial))
    return report


def run_script(mode, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, HERE, mode], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def mirrored_xla():
    return run_script("mirrored-xla")


@pytest.fixture(scope="module")
def mirrored_graph():
    return run_script("mirrored-graph")


def test_mirrored_fit_with_xla_per_replica_matches_single_device(mirrored_xla):
    r = mirrored_xla
    assert r["replicas"] == 2 and r["copies_per_weight"] == 2
    # Whole-step XLA on one device; a graph step around per-replica
    # XLA under MirroredStrategy (whole-step XLA fails there, keras#19005).
    assert r["reference_jit_compile"] is True and r["outer_jit_compile"] is False
    assert len(r["losses"]) == STEPS
    np.testing.assert_allclose(r["losses"], r["reference_losses"], rtol=1e-5, atol=1e-5)
    assert r["weights_max_change"] > 1e-3  # training moved the weights ...
    assert r["weights_max_diff"] < 1e-5    # ... the same way on both setups
    assert r["replicas_identical"] is True


@pytest.mark.slow  # ~30 s; the per-block layout's comparisons below stay in the default run
def test_mirrored_fit_with_stacked_weights_matches_single_device():
    """stack_weights=True (2 blocks, one (2, ...) variable per kind of
    weight) under MirroredStrategy with XLA per replica."""
    r = run_script("mirrored-xla-stacked")
    assert r["replicas"] == 2 and r["copies_per_weight"] == 2
    np.testing.assert_allclose(r["losses"], r["reference_losses"], rtol=1e-5, atol=1e-5)
    assert r["weights_max_change"] > 1e-3
    assert r["weights_max_diff"] < 1e-5
    assert r["replicas_identical"] is True


@pytest.mark.slow  # a second Mirrored training process (~15 s)
def test_mirrored_fit_without_xla_matches_too(mirrored_xla, mirrored_graph):
    r = mirrored_graph
    assert r["outer_jit_compile"] is False and r["reference_jit_compile"] is False
    np.testing.assert_allclose(r["losses"], r["reference_losses"], rtol=1e-5, atol=1e-5)
    assert r["weights_max_diff"] < 1e-5 and r["replicas_identical"] is True
    # The witness tells XLA from no XLA, so the XLA test above is meaningful:
    # from the same initial weights, the first losses differ by far more
    # than the tolerance the matches above use.
    assert r["initial_checksum"] == mirrored_xla["initial_checksum"]
    assert abs(r["losses"][0] - mirrored_xla["losses"][0]) > 1e-3


# Signs in HLO text of what a TPU cannot compile or runs badly: bounded
# dynamic dimensions (`f32[<=64]`), transfers to/from the host, and host
# callbacks (tf.py_function / tf.numpy_function lower to custom calls).
TPU_UNFRIENDLY = ("<=", "infeed", "outfeed", "send(", "recv(", "host", "callback",
                  "py_func", "string")


def tpu_problems(hlo):
    return [word for word in TPU_UNFRIENDLY if word in hlo.lower()]


def test_tpu_check_catches_dynamic_shapes():
    # The check used below must be able to fail: a data-dependent shape.
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def nonzero(x):
        return tf.where(x > 0)

    hlo = nonzero.experimental_get_compiler_ir(tf.constant([1.0, -1.0, 2.0]))("hlo")
    assert "<=" in tpu_problems(hlo)


def test_whole_train_step_compiles_as_a_tpu_needs():
    # TPUStrategy compiles the whole step with XLA: forward, reversible
    # backward, optimizer update, metrics. Fixed-shape inputs must give a
    # static program with no host ops (tokenization stays in tf.data).
    import keras
    import tensorflow as tf

    from keras_reformer import distribute

    keras.utils.set_random_seed(0)
    model = make_model(distribute, tf.distribute.get_strategy(), jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    x = tf.zeros((2, LENGTH), tf.int32)
    y = tf.ones((2, LENGTH), tf.int32)
    step = tf.function(lambda x, y: model.train_step((x, y)), jit_compile=True)
    hlo = step.experimental_get_compiler_ir(x, y)(stage="hlo")
    assert tpu_problems(hlo) == []
    assert "sort" in hlo  # the LSH bucket sort is in this program
    # The optimized stage compiles the program for the device (CPU here).
    assert "ENTRY" in step.experimental_get_compiler_ir(x, y)(stage="optimized_hlo")
    iterations = int(model.optimizer.iterations)
    logs = step(x, y)
    assert int(model.optimizer.iterations) == iterations + 1
    assert np.isfinite(float(logs["loss"]))


def test_prepare_fit_argument_errors():
    import keras

    from keras_reformer import distribute

    with pytest.raises(ValueError, match="`model` must be a keras.Model. Received: model='model'"):
        distribute.prepare_fit("model")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compiled with an optimizer"):
        distribute.prepare_fit(model)
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="jit_compile=.auto."):
        distribute.prepare_fit(model, jit_compile="auto")
    with pytest.raises(ValueError, match="`name` must be one of"):
        distribute.make_strategy("gpu")
    with pytest.raises(ValueError, match="count=0"):
        distribute.use_logical_cpus(0)


def test_chief_and_task_from_tf_config(monkeypatch):
    from keras_reformer import distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.is_chief() and distribute.task_info() == ("worker", 0)
    cluster = {"worker": ["a:1", "b:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert not distribute.is_chief() and distribute.task_info() == ("worker", 1)
    cluster["chief"] = ["c:3"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 0}}))
    assert not distribute.is_chief()


def test_batches_done(tmp_path):
    from keras_reformer import distribute

    assert distribute.batches_done(os.fspath(tmp_path), 5) == 0
    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 2}))
    assert distribute.batches_done(os.fspath(tmp_path), 5) == 10


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    mode = sys.argv[1]
    if mode in ("mirrored-xla", "mirrored-graph", "mirrored-xla-stacked"):
        result = run_mirrored(jit_compile=mode != "mirrored-graph",
                              stacked=mode.endswith("stacked"))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result))
