"""TopPSampler: nucleus sampling."""

import keras
import tensorflow as tf

from keras_reformer.samplers.sampler import Sampler
from keras_reformer.samplers.top_k_sampler import check_k


@keras.saving.register_keras_serializable(package="keras_reformer")
class TopPSampler(Sampler):
    """Nucleus sampling: draws among the most likely tokens whose
    probabilities add up to `p` (the smallest such set, always at least the
    most likely token), renormalised.

    Args:
        p: float in (0, 1]; 1 keeps the whole distribution.
        k: optional int: consider only the `k` most likely tokens at all
            (a full sort of a large vocabulary costs more than a top-k).
        temperature, seed: see `Sampler`.

    Example:

    >>> lm.compile(sampler=kr.samplers.TopPSampler(p=0.9, seed=0))
    """

    def __init__(self, p=0.1, k=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"`p` must be a number in (0, 1]. Received: p={p!r}")
        self.p = float(p)
        self.k = None if k is None else check_k(k)

    def get_next_token(self, probabilities, seed):
        vocabulary = probabilities.shape[-1]
        k = vocabulary if self.k is None else min(self.k, vocabulary)
        top, indices = tf.math.top_k(probabilities, k=k, sorted=True)
        # Keep a token if the mass strictly before it is below p: the most
        # likely token always stays, and the set reaches p.
        before = tf.cumsum(top, axis=-1, exclusive=True)
        top = tf.where(before < self.p, top, tf.zeros_like(top))
        choice = self._draw(top, seed)
        return tf.gather(indices, choice[:, None], batch_dims=1)[:, 0]

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k}
