"""The model family through keras-hub's own test helpers (`TestCase`)."""

import numpy as np

from keras_reformer.models import (
    ReformerBackbone,
    ReformerCausalLM,
    ReformerCausalLMPreprocessor,
)
from tests.keras_hub_test_case import TestCase

BACKBONE = dict(vocabulary_size=258, num_layers=2, hidden_dim=16, num_heads=2,
                intermediate_dim=32, feedforward_chunk_size=8, bucket_size=4,
                max_sequence_length=32, seed=3)


def inputs(batch=2, length=12):
    ids = np.random.default_rng(0).integers(0, 258, size=(batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


class ReformerBackboneTest(TestCase):
    def test_backbone_basics(self):
        # Serialization, eager and compiled calls, variable lengths, the
        # class name, mixed precision (every sublayer's policy), and
        # quantization through a DTypePolicyMap (int8 and float8).
        self.run_backbone_test(
            cls=ReformerBackbone, init_kwargs=BACKBONE, input_data=inputs(),
            expected_output_shape=(2, 12, 32),
        )

    def test_stacked_backbone_basics(self):
        self.run_backbone_test(
            cls=ReformerBackbone, init_kwargs={**BACKBONE, "stack_weights": True},
            input_data=inputs(), expected_output_shape=(2, 12, 32),
        )

    def test_saved_model(self):
        self.run_model_saving_test(
            cls=ReformerBackbone, init_kwargs=BACKBONE, input_data=inputs(),
        )


class ReformerCausalLMTest(TestCase):
    def test_task_basics(self):
        # predict and fit on strings, datasets and split preprocessing.
        init = {
            "backbone": ReformerBackbone(**BACKBONE),
            "preprocessor": ReformerCausalLMPreprocessor(sequence_length=12),
        }
        self.run_task_test(
            cls=ReformerCausalLM, init_kwargs=init,
            train_data=(["the quick brown fox", "jumped over"],),
            expected_output_shape=(2, 12, 258),
        )
