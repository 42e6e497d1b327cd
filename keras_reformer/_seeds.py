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
