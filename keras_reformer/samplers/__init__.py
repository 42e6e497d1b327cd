"""Next-token samplers for `ReformerCausalLM.generate()` (keras-hub's names)."""

import keras

from keras_reformer.samplers.greedy_sampler import GreedySampler
from keras_reformer.samplers.random_sampler import RandomSampler
from keras_reformer.samplers.sampler import Sampler
from keras_reformer.samplers.top_k_sampler import TopKSampler
from keras_reformer.samplers.top_p_sampler import TopPSampler

_BY_NAME = {
    "greedy": GreedySampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
}


def serialize(sampler):
    return keras.saving.serialize_keras_object(sampler)


def get(identifier):
    """A Sampler from a Sampler, a name ("greedy", "random", "top_k",
    "top_p", with default arguments) or a serialized config."""
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _BY_NAME:
            raise ValueError(
                f"Unknown sampler name. Expected one of {sorted(_BY_NAME)} or a "
                f"Sampler instance. Received: sampler={identifier!r}"
            )
        return _BY_NAME[identifier]()
    if isinstance(identifier, dict):
        sampler = keras.saving.deserialize_keras_object(identifier)
        if isinstance(sampler, Sampler):
            return sampler
    raise ValueError(
        f"`sampler` must be a Sampler, one of {sorted(_BY_NAME)} or a "
        f"serialized Sampler. Received: sampler={identifier!r}"
    )


__all__ = ["Sampler", "GreedySampler", "RandomSampler", "TopKSampler",
           "TopPSampler", "get", "serialize"]
