"""No model of the family holds an int32 variable.

TensorFlow keeps int32 resource variables in host memory, so an
XLA-compiled training step or `generate()` on a GPU fails on them
("Trying to access resource .../hash_seed located in device CPU:0 from
device GPU:0"): seen on an H200 with the accelerator check, where
LSHAttention's `hash_seed` was int32. A CPU never shows it, so this test
checks the cause, the variables' dtypes, on every kind of model; and that
a checkpoint written while `hash_seed` was int32 still loads.
"""

import h5py
import numpy as np
import pytest

from keras_reformer.layers import LocalAttention, LSHAttention
from keras_reformer.models import ReformerBackbone, ReformerCausalLM

TINY = dict(vocabulary_size=30, num_layers=2, hidden_dim=16, num_heads=2,
            intermediate_dim=32, bucket_size=4, max_sequence_length=64,
            local_chunk_length=4, seed=4)


def int32_variables(model):
    return [v.path for v in model.variables if str(v.dtype) == "int32"]


@pytest.mark.parametrize("options", [
    {},
    {"stack_weights": False},
    {"reversible": False},
    {"attention_types": ["local", "lsh"]},
    {"reference_rules": True},
], ids=["stacked", "per-block", "plain-residual", "local-and-lsh", "reference-rules"])
def test_no_model_holds_an_int32_variable(options):
    lm = ReformerCausalLM(backbone=ReformerBackbone(**TINY, **options))
    ids = np.ones((1, 12), "int32")
    lm({"token_ids": ids, "padding_mask": ids})
    assert lm.variables, "the model built no variables"
    assert int32_variables(lm) == []


@pytest.mark.parametrize("layer", [
    lambda: LSHAttention(num_heads=2, key_dim=8, bucket_size=4, seed=1),
    lambda: LocalAttention(num_heads=2, key_dim=8, chunk_length=4),
], ids=["lsh", "local"])
def test_no_attention_layer_holds_an_int32_variable(layer):
    layer = layer()
    x = np.random.default_rng(0).normal(size=(1, 16, 8)).astype("float32")
    layer(x, x)
    assert int32_variables(layer) == []


def test_a_checkpoint_with_an_int32_hash_seed_still_loads(tmp_path):
    # Checkpoints saved before the change hold hash_seed as int32: write one
    # (this model's file with its int64 datasets rewritten as int32), load it
    # into a model of another seed, and compare with the model that saved it.
    ids = np.random.default_rng(1).integers(1, 30, (1, 32)).astype("int32")
    data = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    saved = ReformerCausalLM(backbone=ReformerBackbone(**TINY | {"seed": 11}))
    expected = np.asarray(saved(data))
    path = str(tmp_path / "old.weights.h5")
    saved.save_weights(path)
    rewritten = []
    with h5py.File(path, "r+") as f:
        def visit(name, item):
            if isinstance(item, h5py.Dataset) and item.dtype == np.int64:
                rewritten.append(name)
        f.visititems(visit)
        for name in rewritten:
            value = f[name][...]
            del f[name]
            f.create_dataset(name, data=value.astype(np.int32))
    assert rewritten, "no int64 dataset (hash_seed) in the file"

    loaded = ReformerCausalLM(backbone=ReformerBackbone(**TINY | {"seed": 0}))
    loaded(data)
    loaded.load_weights(path)
    seeds = [v for v in loaded.variables if "hash_seed" in v.path]
    assert seeds and all(str(v.dtype) == "int64" for v in seeds)
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(v.numpy()) for v in seeds]),
        np.concatenate([np.ravel(v.numpy()) for v in saved.variables if "hash_seed" in v.path]))
    np.testing.assert_allclose(np.asarray(loaded(data)), expected, rtol=1e-6, atol=1e-6)
