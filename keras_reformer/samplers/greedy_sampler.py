"""GreedySampler: argmax decoding."""

import keras
import tensorflow as tf

from keras_reformer.samplers.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_reformer")
class GreedySampler(Sampler):
    """Always the most likely token (argmax of the logits); no randomness.

    Example:

    >>> lm.compile(sampler="greedy")
    """

    def __init__(self, **kwargs):
        # Temperature does not change an argmax; accepted for config symmetry.
        super().__init__(**kwargs)

    def __call__(self, logits, seed):
        # argmax of the logits, not of a softmax: no rounding ties added.
        return tf.argmax(tf.cast(logits, tf.float32), axis=-1, output_type=tf.int32)

    def get_next_token(self, probabilities, seed):
        return tf.argmax(probabilities, axis=-1, output_type=tf.int32)
