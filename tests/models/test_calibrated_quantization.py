"""The calibrated modes ("gptq", "awq") on the Reformer models: the stages
Keras calibrates compute the backbone's forward pass, calibration sees the
activations (it beats round-to-nearest at the same bits), and the result
decodes and stacks like the other modes; saving it is refused while
Keras cannot read such files back."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.quantizers import AWQConfig, GPTQConfig

from keras_reformer.models import (
    ReformerBackbone,
    ReformerCausalLM,
    ReformerTokenizer,
)

CONFIG = dict(vocabulary_size=258, num_layers=2, hidden_dim=64, num_heads=4,
              feedforward_chunk_size=16, bucket_size=8, max_sequence_length=128,
              seed=3)
LENGTH = 64
TOKENIZER = ReformerTokenizer()
TEXTS = [
    "".join(chr(c) for c in np.random.default_rng(i).integers(32, 127, LENGTH))
    for i in range(8)
]

pytestmark = pytest.mark.usefixtures("no_gc_on_variable_delete")


def config(mode):
    if mode == "gptq":
        return GPTQConfig(TEXTS, TOKENIZER, weight_bits=4, num_samples=len(TEXTS),
                          sequence_length=LENGTH)
    return AWQConfig(TEXTS, TOKENIZER, num_samples=len(TEXTS), sequence_length=LENGTH)


def inputs():
    ids = np.asarray(TOKENIZER(TEXTS[:2])).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def exact_backbone(stack_weights=False):
    """Bidirectional, one chunk over the whole input: attention without
    hashing, so a comparison sees every quantized kernel and no bucket
    flips."""
    keras.utils.set_random_seed(1)
    return ReformerBackbone(**{**CONFIG, "bucket_size": LENGTH}, causal=False,
                            stack_weights=stack_weights)


def blocks_dense_layers(backbone):
    return [
        layer for f, g in backbone.reversible_stack.blocks
        for block in (f, g) for layer in block._flatten_layers()
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]


def test_the_stages_compute_the_backbone_forward_pass():
    backbone = ReformerBackbone(**CONFIG)  # causal, hashed
    x = inputs()
    structure = backbone.get_quantization_layer_structure("gptq")
    assert backbone.get_quantization_layer_structure("int8") is None
    assert len(structure["sequential_blocks"]) == CONFIG["num_layers"]
    streams = x["token_ids"]
    for stage in structure["pre_block_layers"] + structure["sequential_blocks"]:
        streams = stage(streams)
    # The reference: the backbone's own output, whose final norm takes the
    # concatenated streams.
    want = np.asarray(backbone(x))
    got = np.asarray(backbone.final_norm(streams))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_calibration_beats_round_to_nearest_at_the_same_bits(mode):
    x = inputs()
    reference = exact_backbone()
    before = np.asarray(reference(x))
    reference.quantize("int4", filters=lambda layer: layer in blocks_dense_layers(reference))
    rtn = np.abs(np.asarray(reference(x)) - before).mean()

    backbone = exact_backbone()
    embedding = np.array(backbone.token_embedding.embeddings)
    backbone.quantize(mode, config=config(mode))
    calibrated = np.abs(np.asarray(backbone(x)) - before).mean()
    layers = blocks_dense_layers(backbone)
    assert layers and all(layer.quantization_mode == mode for layer in layers)
    # Outside the blocks nothing changes (Keras would leave it uncalibrated).
    assert backbone.token_embedding.quantization_mode is None
    np.testing.assert_array_equal(np.array(backbone.token_embedding.embeddings), embedding)
    # A calibration that saw no activations equals round-to-nearest (to
    # float noise: measured 1e-6 apart). GPTQ that saw them is better on data
    # like its own (about 15% here). AWQ's scale search only pays off where
    # some input channels are much larger than others, which a random model
    # lacks: its check is that the scales follow the activations.
    if mode == "gptq":
        assert 0 < calibrated < 0.95 * rtn, (calibrated, rtn)
    else:
        assert abs(calibrated - rtn) > 1e-3 * rtn, (calibrated, rtn)
        # The search may keep scale 1 (exponent 0) in a layer where that is
        # best (the value projection, in some runs): the scales must vary in
        # most layers, which only seen activations make them do.
        scales = [np.array(layer.awq_scales) for layer in layers]
        assert all(np.isfinite(s).all() for s in scales)
        varied = [layer.path for layer, s in zip(layers, scales)
                  if s.std() > 1e-3 * s.mean()]
        assert len(varied) >= len(layers) // 2, varied


def test_gptq_model_decodes_and_stacks_and_refuses_to_save(tmp_path):
    keras.utils.set_random_seed(1)
    lm = ReformerCausalLM(ReformerBackbone(**CONFIG))
    keras.utils.set_random_seed(1)
    stacked = ReformerCausalLM(ReformerBackbone(**CONFIG, stack_weights=True))
    head = np.array(lm.lm_head.kernel)
    for model in (lm, stacked):
        model.quantize("gptq", config=config("gptq"))
    x = inputs()
    full = np.asarray(lm(x))
    # The head stays in float; the stacked layout computes the same model.
    assert lm.lm_head.quantization_mode is None
    np.testing.assert_array_equal(np.array(lm.lm_head.kernel), head)
    np.testing.assert_allclose(np.asarray(stacked(x)), full, atol=1e-5)

    # Cached decoding still equals the full pass.
    decoder = lm._decoder()
    mask = np.arange(LENGTH)[None] < np.array([[10], [25]])
    logits, _, cache = decoder.prompt_pass(tf.constant(x["token_ids"]), tf.constant(mask), LENGTH)
    position = mask.sum(1)
    for _ in range(4):
        logits, _, cache = decoder.step(
            tf.constant(x["token_ids"][[0, 1], position]),
            tf.constant(position, tf.int32), cache)
        np.testing.assert_allclose(logits.numpy(), full[[0, 1], position], atol=1e-4)
        position = position + 1

    # Keras 3.15 writes these weights without their zero points and cannot
    # read the file back: saving is a clear error, not a broken file.
    with pytest.raises(ValueError, match="'gptq' cannot be saved"):
        lm.save(str(tmp_path / "gptq.keras"))
