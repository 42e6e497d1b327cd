"""TopKSampler: a draw among the k most likely tokens."""

import keras
import tensorflow as tf

from keras_reformer.samplers.sampler import Sampler


def check_k(k):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
    return k


@keras.saving.register_keras_serializable(package="keras_reformer")
class TopKSampler(Sampler):
    """Draws among the `k` most likely tokens, renormalised.

    Args:
        k: int >= 1 (k larger than the vocabulary means all of it).
        temperature, seed: see `Sampler`.

    Example:

    >>> lm.compile(sampler=kr.samplers.TopKSampler(k=5, seed=0))
    """

    def __init__(self, k=5, **kwargs):
        super().__init__(**kwargs)
        self.k = check_k(k)

    def get_next_token(self, probabilities, seed):
        k = min(self.k, probabilities.shape[-1])
        top, indices = tf.math.top_k(probabilities, k=k, sorted=False)
        choice = self._draw(top, seed)
        return tf.gather(indices, choice[:, None], batch_dims=1)[:, 0]

    def get_config(self):
        return {**super().get_config(), "k": self.k}
