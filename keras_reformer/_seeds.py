"""Seeds: one range and one validation for every layer and model.

A seed left as None is drawn once, at construction, and then stored in the
config, so a saved and reloaded model keeps it.
"""

import random

# Seeds are drawn below 2**30 so that `seed + offset` stays a valid int32 for
# the offsets the layers add (factor hashes, dropout streams).
SEED_LIMIT = 2**30


def resolve_seed(seed, name="seed"):
    """A validated non-negative int seed; draws one if `seed` is None."""
    if seed is None:
        return random.randrange(SEED_LIMIT)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"`{name}` must be None or an integer in [0, {SEED_LIMIT}). "
            f"Received: {name}={seed!r}"
        )
    return seed


def fresh_initializer(initializer, offset):
    """A copy of a Keras initializer that draws values of its own.

    Keras' random initializers draw the same numbers on every call (an
    unseeded one fixes a seed when it is made), so one instance shared by two
    weights gives both the same leading values. The copy is made from the
    config: an unseeded one gets a new seed, one seeded with an int gets
    `seed + offset` (give each weight its own offset). Initializers without
    randomness are copied unchanged.
    """
    config = initializer.get_config()
    seed = config.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        config["seed"] = seed + offset
    return initializer.__class__.from_config(config)
