"""SinusoidalPositionEmbedding against the formula of Vaswani et al. in NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import SinusoidalPositionEmbedding


def reference(length, width, max_wavelength=10000.0):
    table = np.zeros((length, width))
    for p in range(length):
        for i in range(width):
            angle = p / max_wavelength ** (2 * (i // 2) / width)
            table[p, i] = np.sin(angle) if i % 2 == 0 else np.cos(angle)
    return table


@pytest.mark.parametrize("width,wavelength", [(8, 10000), (7, 100.0)])
def test_equals_formula(width, wavelength):
    layer = SinusoidalPositionEmbedding(50, max_wavelength=wavelength)
    out = np.asarray(layer(tf.zeros((2, 20, width))))
    np.testing.assert_allclose(out[0], reference(20, width, wavelength), atol=1e-5)
    np.testing.assert_array_equal(out[1], out[0])


def test_too_long_inputs_fail_clearly():
    layer = SinusoidalPositionEmbedding(6)
    with pytest.raises(ValueError, match="Input length 7 exceeds max_sequence_length=6"):
        layer(tf.zeros((1, 7, 4)))
    fn = tf.function(layer.__call__, input_signature=[tf.TensorSpec([None, None, 4])])
    assert fn(tf.zeros((1, 6, 4))).shape == (1, 6, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_sequence_length=6"):
        fn(tf.zeros((1, 7, 4)))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"max_sequence_length": 2.0}, "max_sequence_length"),
        ({"max_sequence_length": 8, "max_wavelength": 0}, "max_wavelength"),
        ({"max_sequence_length": 8, "max_wavelength": "big"}, "max_wavelength"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be .* Received: {name}="):
        SinusoidalPositionEmbedding(**kwargs)


def test_config_round_trip():
    layer = SinusoidalPositionEmbedding(64, max_wavelength=500)
    clone = SinusoidalPositionEmbedding.from_config(layer.get_config())
    x = tf.zeros((1, 10, 6))
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))
    assert clone.get_config() == layer.get_config()
