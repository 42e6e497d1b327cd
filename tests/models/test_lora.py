"""LoRA through keras-hub's `enable_lora`, in both weight layouts."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.models import ReformerBackbone, ReformerCausalLM

CONFIG = dict(vocabulary_size=40, num_layers=2, hidden_dim=16, num_heads=2,
              intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
              max_sequence_length=64, seed=3)


def counting_data(rows=16, length=33):
    # Each token is the previous one plus one (mod 39): learnable.
    start = np.random.default_rng(0).integers(1, 40, size=(rows, 1))
    ids = ((start + np.arange(length)) % 39 + 1).astype(np.int32)
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}, ids[:, 1:]


def lora_lm(stack_weights, reversible=True, seed=0):
    keras.utils.set_random_seed(seed)
    lm = ReformerCausalLM(ReformerBackbone(**CONFIG, stack_weights=stack_weights,
                                           reversible=reversible))
    lm.enable_lora(2)
    return lm


def lora_variables(model):
    return [v for v in model.trainable_variables if "lora" in v.path]


@pytest.mark.parametrize("stack_weights", [False, True])
def test_enable_lora_targets_the_shared_qk_and_value_projections(stack_weights):
    lm = lora_lm(stack_weights)
    # keras-hub's rule: every weight is frozen but the target layers' LoRA
    # factors and biases; their kernels are frozen too.
    trainable = lm.trainable_variables
    assert trainable and all(any(p in v.path.replace(".", "/") for p in ("/qk/", "/value/"))
                             and not v.path.endswith("kernel") for v in trainable)
    f = lm.backbone.reversible_stack.blocks[0][0]
    assert f.attention.qk_dense.lora_enabled and f.attention.value_dense.lora_enabled
    assert not f.attention.output_dense.lora_enabled
    # Per block (2) and projection (qk, value): a, b and the bias; stacked,
    # one (num_layers, ...) variable per kind.
    assert len(trainable) == (6 if stack_weights else 12)
    assert len(lora_variables(lm)) == (4 if stack_weights else 8)
    if stack_weights:
        assert all(v.shape[0] == CONFIG["num_layers"] for v in trainable)


@pytest.mark.parametrize("stack_weights", [False, True])
def test_fit_trains_lora_only_and_round_trips_through_a_preset(tmp_path, stack_weights):
    lm = lora_lm(stack_weights)
    x, y = counting_data()
    frozen = {v.path: np.array(v) for v in lm.variables
              if not v.trainable and "seed_generator" not in v.path}
    lora_before = [np.array(v) for v in lora_variables(lm)]
    assert frozen
    lm.compile(keras.optimizers.Adam(5e-2))
    history = lm.fit(x, y, epochs=15, batch_size=8, verbose=0)
    loss = history.history["loss"]
    # Rank-2 attention projections of a random network: a modest but clear fall.
    assert loss[-1] < 0.95 * loss[0], loss
    for v in lm.variables:
        if v.path in frozen:
            np.testing.assert_array_equal(np.array(v), frozen[v.path], err_msg=v.path)
    assert all(np.abs(np.array(v) - b).max() > 0
               for v, b in zip(lora_variables(lm), lora_before))
    # A preset keeps the trained model: keras merges LoRA into the kernels.
    want = lm.predict(x, verbose=0)
    preset = str(tmp_path / "preset")
    lm.save_to_preset(preset)
    loaded = ReformerCausalLM.from_preset(preset)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=1e-5)


@pytest.mark.parametrize("stack_weights", [False, True])
def test_lora_gradients_through_the_recomputation_equal_plain_autodiff(stack_weights):
    # The reversible backward recomputes each block; its LoRA gradients must
    # be those of ordinary autodiff through the same network.
    models = [lora_lm(stack_weights, reversible=r) for r in (True, False)]
    rng = np.random.default_rng(1)
    for a, b in zip(models[0].variables, models[1].variables):
        if "lora_kernel_b" in a.path:  # zero at init: LoRA would be a no-op
            a.assign(rng.normal(0, 0.3, a.shape).astype("float32"))
        b.assign(a)
    x, y = counting_data(rows=2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = []
    for lm in models:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, lm(x, training=True))
        grads.append(tape.gradient(loss, lora_variables(lm)))
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
