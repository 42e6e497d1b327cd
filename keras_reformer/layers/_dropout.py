"""keras.layers.Dropout whose seed state is saved with the weights."""

import keras

from keras_reformer._seeds import SeedStatesInWeights


@keras.saving.register_keras_serializable(package="keras_reformer")
class Dropout(SeedStatesInWeights, keras.layers.Dropout):
    """The same layer and config as `keras.layers.Dropout`; its
    `SeedGenerator` state is in the weights file (see `SeedStatesInWeights`),
    so a restored checkpoint continues its masks."""
