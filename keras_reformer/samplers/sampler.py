"""Sampler: the base class of the next-token samplers of `generate()`."""

import keras
import tensorflow as tf


def _check_seed(seed):
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or seed < 0
    ):
        raise ValueError(
            f"`seed` must be None or a non-negative integer. Received: seed={seed!r}"
        )
    return seed


@keras.saving.register_keras_serializable(package="keras_reformer")
class Sampler:
    """Picks the next token of every row from its logits.

    Samplers are stateless: each call gets a `(2,)` int32 seed from the
    decode loop (derived from `seed` and the step number with
    `tf.random.experimental.stateless_fold_in`), so that a seeded
    `generate()` is reproducible, also in a compiled (XLA) loop, where a
    stateful generator would advance unpredictably. As with all stateless
    random ops, XLA and non-XLA runs may draw different numbers
    (tensorflow#121243).

    Subclasses implement `get_next_token(probabilities, seed)`.

    Args:
        temperature: float > 0; logits are divided by it before the softmax
            (below 1 sharpens, above 1 flattens).
        seed: int or None. None draws a new seed at every `generate()` call.

    Example:

    >>> lm.compile(sampler=kr.samplers.TopKSampler(k=10, temperature=0.7, seed=1))
    """

    def __init__(self, temperature=1.0, seed=None):
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature > 0
        ):
            raise ValueError(
                "`temperature` must be a number > 0 (use GreedySampler for "
                f"argmax decoding). Received: temperature={temperature!r}"
            )
        self.temperature = float(temperature)
        self.seed = _check_seed(seed)

    def compute_probabilities(self, logits):
        """(B, V) logits -> (B, V) float32 probabilities at the temperature."""
        logits = tf.cast(logits, tf.float32)
        return tf.nn.softmax(logits / self.temperature, axis=-1)

    def get_next_token(self, probabilities, seed):
        """(B, V) probabilities, (2,) int32 seed -> (B,) int32 token ids."""
        raise NotImplementedError

    def __call__(self, logits, seed):
        return self.get_next_token(self.compute_probabilities(logits), seed)

    @staticmethod
    def _draw(probabilities, seed):
        # log(0) = -inf: tokens cut off by top-k / top-p are never drawn.
        return tf.random.stateless_categorical(
            tf.math.log(probabilities), 1, seed=seed, dtype=tf.int32
        )[:, 0]

    def get_config(self):
        return {"temperature": self.temperature, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
