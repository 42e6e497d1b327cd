"""Finite datasets evaluate to the mean over their batches (Keras 3.15 graph-mode bug)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer import data
from keras_reformer.data._batch_shape import needs_relaxing, relax_batch_size
from keras_reformer.models import ReformerBackbone, ReformerCausalLM

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batch_mean(model, dataset):
    """The reference: the model called on each batch, losses averaged."""
    losses = [float(LOSS(y, model(x, training=False))) for x, y in dataset]
    return np.mean(losses), len(losses)


def unknown_length(x, y, batch):
    """A finite dataset of static batch size whose length tf.data cannot tell."""
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    return ds.filter(lambda *_: True)


def byte_model():
    tokens = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(256, 8)(tokens)
    model = keras.Model(tokens, keras.layers.Dense(256)(hidden))
    model.compile(loss=LOSS, jit_compile=False)
    return model


def test_keras_still_miscounts_finite_static_batches():
    """Fails once Keras counts right: then drop data/_batch_shape.py."""
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, 256, (12, 5)), rng.integers(0, 256, (12, 5))
    ds = unknown_length(ids.astype(np.int32), targets.astype(np.int32), 4)
    assert needs_relaxing(ds)
    model = byte_model()
    want, n = batch_mean(model, ds)
    got = byte_model()
    got.set_weights(model.get_weights())
    assert got.evaluate(ds, verbose=0) == pytest.approx(want * n / (n + 1), rel=1e-5)
    fresh = byte_model()
    fresh.set_weights(model.get_weights())
    assert fresh.evaluate(relax_batch_size(ds), verbose=0) == pytest.approx(want, rel=1e-5)


def test_finite_lm_dataset_evaluates_to_the_batch_mean():
    files = data.default_corpus_files(max_bytes=40_000)
    ds = data.lm_dataset(files, 32, 4, shuffle=False, repeat=False,
                         with_padding_mask=False).take(5)
    assert ds.element_spec[0].shape.as_list() == [None, 32]
    model = byte_model()
    want, n = batch_mean(model, ds)
    assert n == 5
    assert model.evaluate(ds, verbose=0) == pytest.approx(want, rel=1e-5)


def test_reformer_model_evaluate_and_validation_on_a_users_dataset():
    model = ReformerCausalLM(ReformerBackbone(
        40, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        bucket_size=8, max_sequence_length=32, seed=1))
    model.compile(keras.optimizers.SGD(0.0), LOSS, jit_compile=False)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, (12, 32)).astype(np.int32)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    ds = unknown_length(inputs, rng.integers(0, 40, (12, 32)).astype(np.int32), 4)
    want, n = batch_mean(model, ds)
    assert n == 3
    got = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert got == pytest.approx(want, rel=1e-5)
    history = model.fit(ds, validation_data=ds, epochs=1, verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(want, rel=1e-5)
