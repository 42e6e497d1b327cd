"""AxialPositionEmbedding against a table built by hand from its two axes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import AxialPositionEmbedding


def test_positions_are_concatenated_axis_rows():
    layer = AxialPositionEmbedding(48, axial_shape=(4, 12), axial_dims=(3, 5))
    x = tf.zeros((2, 30, 8))
    out = np.asarray(layer(x))
    first, second = np.asarray(layer.first), np.asarray(layer.second)
    for p in range(30):
        want = np.concatenate([first[p // 12], second[p % 12]])
        np.testing.assert_allclose(out[0, p], want)
        np.testing.assert_allclose(out[1, p], want)
    assert layer.count_params() == 4 * 3 + 12 * 5  # sum, not product


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
@pytest.mark.parametrize("graph", [False, True])
def test_gradients_sum_each_row_over_its_positions(graph, dtype):
    # The layer's own gradient against one built by hand: row i of the first
    # table gets the upstream gradient of every position p // l2 == i,
    # summed over the batch; row j of the second, of every p % l2 == j.
    layer = AxialPositionEmbedding(48, axial_shape=(4, 12), axial_dims=(3, 5),
                                   dtype=dtype)
    x = tf.zeros((2, 30, 8))
    upstream = np.random.default_rng(0).normal(size=(2, 30, 8)).astype("float32")

    def grads():
        with tf.GradientTape() as tape:
            out = tf.cast(layer(x), tf.float32)
            loss = tf.reduce_sum(out * upstream)
        return tape.gradient(loss, [layer.first.value, layer.second.value])

    d_first, d_second = tf.function(grads)() if graph else grads()
    want_first, want_second = np.zeros((4, 3)), np.zeros((12, 5))
    for p in range(30):
        want_first[p // 12] += upstream[:, p, :3].sum(0)
        want_second[p % 12] += upstream[:, p, 3:].sum(0)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(d_first), want_first, atol=tolerance, rtol=tolerance)
    np.testing.assert_allclose(np.asarray(d_second), want_second, atol=tolerance, rtol=tolerance)
    assert d_first.dtype == tf.float32 and d_second.dtype == tf.float32


def test_default_shape_covers_maximum_and_any_shorter_length():
    layer = AxialPositionEmbedding(65536)
    assert layer.axial_shape[0] * layer.axial_shape[1] >= 65536
    full = np.asarray(layer(tf.zeros((1, 300, 16))))
    short = np.asarray(layer(tf.zeros((1, 7, 16))))
    np.testing.assert_array_equal(short[0], full[0, :7])


@pytest.mark.parametrize("maximum", [20, 18])
def test_too_long_inputs_fail_clearly(maximum):
    # With 18 the (4, 5) grid has room for 20: the stated maximum still rules.
    layer = AxialPositionEmbedding(maximum, axial_shape=(4, 5))
    assert layer(tf.zeros((1, maximum, 4))).shape == (1, maximum, 4)
    with pytest.raises(ValueError, match=f"max_sequence_length={maximum}"):
        layer(tf.zeros((1, maximum + 1, 4)))
    fn = tf.function(layer.__call__, input_signature=[tf.TensorSpec([None, None, 4])])
    assert fn(tf.zeros((1, maximum, 4))).shape == (1, maximum, 4)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"exceeds the axial maximum: max_sequence_length={maximum}"):
        fn(tf.zeros((1, maximum + 1, 4)))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"max_sequence_length": 100, "axial_shape": (4, 5)}, "axial_shape"),
        ({"max_sequence_length": 10, "axial_shape": (4,)}, "axial_shape"),
        ({"max_sequence_length": 10, "axial_dims": (2, -1)}, "axial_dims"),
        ({"max_sequence_length": 10.0}, "max_sequence_length"),
        ({"max_sequence_length": 10, "axial_shape": (2, True)}, "axial_shape"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must .*Received: .*{name}="):
        AxialPositionEmbedding(**kwargs)


def test_dims_must_sum_to_width():
    layer = AxialPositionEmbedding(10, axial_dims=(2, 3))
    with pytest.raises(ValueError, match="axial_dims"):
        layer(tf.zeros((1, 5, 6)))


def test_config_round_trip():
    layer = AxialPositionEmbedding(100, axial_shape=(10, 10), axial_dims=(4, 4))
    clone = AxialPositionEmbedding.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_default_initializer_is_normal_with_stddev_002():
    layer = AxialPositionEmbedding(4096, axial_shape=(64, 64))
    layer.build((None, None, 256))
    values = np.concatenate([np.ravel(layer.first), np.ravel(layer.second)])
    assert abs(values.mean()) < 0.002
    np.testing.assert_allclose(values.std(), 0.02, rtol=0.05)


@pytest.mark.parametrize("initializer,stddev", [
    ("random_normal", 0.05),  # Keras' own default, no longer remapped
    ({"class_name": "RandomNormal", "config": {"stddev": 0.3, "seed": 4}}, 0.3),
])
def test_any_keras_initializer_is_passed_through(initializer, stddev):
    layer = AxialPositionEmbedding(4096, axial_shape=(64, 64),
                                   initializer=initializer)
    layer.build((None, None, 256))
    values = np.concatenate([np.ravel(layer.first), np.ravel(layer.second)])
    np.testing.assert_allclose(values.std(), stddev, rtol=0.05)


@pytest.mark.parametrize("initializer", [None, "random_normal", "glorot_uniform",
                                         keras.initializers.RandomUniform(seed=3)])
def test_tables_do_not_share_values(initializer):
    # Keras initializers draw the same numbers on every call: one instance
    # used for both tables gave them the same leading values.
    layer = AxialPositionEmbedding(64, axial_shape=(8, 8), initializer=initializer)
    layer.build((None, None, 8))
    first, second = np.ravel(layer.first), np.ravel(layer.second)
    assert not np.allclose(first[:8], second[:8])


def test_config_round_trip_with_non_default_initializer(tmp_path):
    initializer = keras.initializers.TruncatedNormal(stddev=0.1, seed=7)
    layer = AxialPositionEmbedding(100, axial_shape=(10, 10), initializer=initializer)
    config = layer.get_config()
    assert config["initializer"]["class_name"] == "TruncatedNormal"
    assert config["initializer"]["config"]["stddev"] == 0.1
    clone = AxialPositionEmbedding.from_config(config)
    assert clone.get_config() == config
    x = tf.zeros((1, 30, 8))
    # Seeded: the same tables again, in a clone and after a .keras round trip.
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))
    inputs = keras.Input((30, 8))
    model = keras.Model(inputs, AxialPositionEmbedding.from_config(config)(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded(x), model(x))
    assert loaded.layers[-1].get_config()["initializer"] == config["initializer"]


def test_bad_initializer_names_it():
    with pytest.raises(ValueError, match="nonsense"):
        AxialPositionEmbedding(10, initializer="nonsense")
