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


# Weights-file entries of a layer's `SeedGenerator` states, after the
# layer's own numbered entries ("0", "1", ...).
_STATE_KEY = "seed_generator_state_{}"


class _FirstEntries:
    """A read-only view of a weights-file store without its seed states:
    what Keras' own `load_own_variables` expects to find."""

    def __init__(self, store, keys):
        self._store, self._keys = store, keys

    def keys(self):
        return list(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getitem__(self, key):
        return self._store[key]


class SeedStatesInWeights:
    """Mixin for a `keras.layers.Layer`: its `SeedGenerator` states are
    saved and loaded with its variables.

    Keras leaves seed-generator states out of `save_own_variables`, so
    `model.save_weights`, `model.save` and `BackupAndRestore` would bring a
    layer's dropout and hashing streams back to their initial state. With
    this mixin they are written as extra entries (`seed_generator_state_0`,
    ...) beside the layer's own; a file without them (written before, or by
    a layer without generators) still loads and leaves the states as they
    are.
    """

    def _saved_seed_states(self):
        return [generator.state for generator in self._seed_generators]

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, state in enumerate(self._saved_seed_states()):
            store[_STATE_KEY.format(i)] = state

    def load_own_variables(self, store):
        states = self._saved_seed_states()
        names = [_STATE_KEY.format(i) for i in range(len(states))]
        if states and all(name in store for name in names):
            for name, state in zip(names, states):
                state.assign(store[name])
            store = _FirstEntries(store, [k for k in store.keys() if k not in names])
        super().load_own_variables(store)
