"""RandomSampler: a draw from the whole distribution."""

import keras

from keras_reformer.samplers.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_reformer")
class RandomSampler(Sampler):
    """Draws from `softmax(logits / temperature)` over the whole vocabulary.

    Example:

    >>> lm.compile(sampler=kr.samplers.RandomSampler(temperature=0.8, seed=3))
    """

    def get_next_token(self, probabilities, seed):
        return self._draw(probabilities, seed)
