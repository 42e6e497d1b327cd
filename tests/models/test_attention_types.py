"""ReformerBackbone with local attention layers (`attention_types`): each
local layer is a LocalAttention, the stack is the same function as a plain
residual loop over the same blocks, and the model trains, saves and
generates."""

import keras
import numpy as np
import pytest

from keras_reformer.layers import LocalAttention, LSHAttention
from keras_reformer.models import ReformerBackbone, ReformerCausalLM

TINY = dict(vocabulary_size=30, num_layers=3, hidden_dim=16, num_heads=2,
            intermediate_dim=32, bucket_size=4, max_sequence_length=64,
            local_chunk_length=6, seed=4)


def inputs(length=23, batch=2, seed=0):
    ids = np.random.default_rng(seed).integers(1, 30, (batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def test_layers_follow_the_list_and_the_local_settings():
    backbone = ReformerBackbone(**TINY, attention_types=["local", "lsh", "local"],
                                local_num_chunks_before=2, local_num_chunks_after=1)
    kinds = [type(f.attention) for f, _ in backbone.reversible_stack.blocks]
    assert kinds == [LocalAttention, LSHAttention, LocalAttention]
    local = backbone.reversible_stack.blocks[0][0].attention
    assert (local.chunk_length, local.num_chunks_before, local.num_chunks_after) == (
        6, 2, 1)
    # Mixed types cannot share one loop body: per-block weights.
    assert not backbone.reversible_stack.stacked


def test_forward_equals_a_plain_residual_loop():
    # Independent of the reversible machinery: y1 = x1 + f(x2), y2 = x2 + g(y1)
    # written out over the blocks, then the final norm.
    backbone = ReformerBackbone(**TINY, attention_types=["local", "lsh", "local"])
    data = inputs()
    got = np.asarray(backbone(data))
    mask = np.ones(data["token_ids"].shape, bool)
    x = backbone.embed(data["token_ids"], mask)
    x1 = x2 = x
    for f, g in backbone.reversible_stack.blocks:
        x1 = x1 + f(x2, mask=mask)
        x2 = x2 + g(x1)
    want = np.asarray(backbone.final_norm(keras.ops.concatenate([x1, x2], -1)))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_all_local_layers_stack_their_weights(tmp_path):
    backbone = ReformerBackbone(**TINY, attention_types=["local"] * 3)
    assert backbone.reversible_stack.stacked
    flat = ReformerBackbone(**TINY, attention_types=["local"] * 3, stack_weights=False)
    backbone.save_weights(tmp_path / "w.weights.h5")
    flat.load_weights(tmp_path / "w.weights.h5")
    data = inputs(seed=1)
    np.testing.assert_allclose(flat(data), backbone(data), atol=2e-5)


def test_fit_lowers_the_loss_and_the_config_round_trips(tmp_path):
    lm = ReformerCausalLM(ReformerBackbone(**TINY, attention_types=["local", "lsh", "local"]))
    lm.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False,
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = inputs(length=24, batch=8, seed=2)
    x = {k: v[:, :-1] for k, v in data.items()}
    y = data["token_ids"][:, 1:]
    # One batch per epoch, no dropout: epoch k's loss is that of the weights
    # after k - 1 updates.
    losses = lm.fit(x, y, epochs=16, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.3
    lm.save(tmp_path / "lm.keras")
    loaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert loaded.backbone.get_config() == lm.backbone.get_config()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), lm.predict(x, verbose=0),
                               atol=1e-5)


def test_generate_runs_on_mixed_layers():
    lm = ReformerCausalLM(ReformerBackbone(**TINY, attention_types=["lsh", "local", "lsh"]))
    lm.compile(sampler="greedy")
    ids = np.zeros((2, 20), "int32")
    ids[:, :5] = np.arange(1, 6)
    mask = (ids > 0).astype("int32")
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    # Greedy: the first generated token is the argmax of the full pass.
    full = np.asarray(lm({"token_ids": ids[:, :5], "padding_mask": mask[:, :5]}))
    np.testing.assert_array_equal(out["token_ids"][:, 5], full[:, -1].argmax(-1))


@pytest.mark.parametrize("value,error,match", [
    (["lsh"], ValueError, "one attention type per layer"),
    ("local", TypeError, "attention_types"),
    (["lsh", "dense", "lsh"], ValueError, "dense"),
])
def test_bad_attention_types_are_named(value, error, match):
    with pytest.raises(error, match=match):
        ReformerBackbone(**TINY, attention_types=value)
