"""ChunkedFeedForward with quantized and LoRA Dense layers, against Keras' own.

The reference is `keras.Sequential([Dense(intermediate, "gelu"), Dense(out)])`
holding the same float weights, quantized with the same mode (or given the
same LoRA weights): Keras computes it, not the code under test. The length,
11 with slices of 4, leaves a ragged last slice.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.ops import sequence_slices

FEATURES, INTERMEDIATE, CHUNK, LENGTH = 6, 20, 4, 11


@pytest.fixture(autouse=True)
def fixed_initial_weights():
    keras.utils.set_random_seed(2024)

pytestmark = pytest.mark.usefixtures("no_gc_on_variable_delete")


def quantize(layer, mode):
    # Through a model, as users do; its InputLayer warns that it has no
    # `quantize`.
    model = keras.Sequential([keras.Input((None, FEATURES)), layer])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.quantize(mode)


def make_pair(mode=None, lora=False, dtype=None, chunk_size=CHUNK):
    """A ChunkedFeedForward and its Keras reference, with the same weights."""
    ffn = ChunkedFeedForward(INTERMEDIATE, chunk_size=chunk_size, seed=3, dtype=dtype)
    ffn.build((None, None, FEATURES))
    denses = [ffn.intermediate_dense, ffn.output_dense]
    rng = np.random.default_rng(7)
    for dense in denses:
        # Non-zero biases, so that a bias mistake shows.
        dense.bias.assign(rng.normal(size=dense.bias.shape) * 0.5)
    ref = keras.Sequential([
        keras.Input((None, FEATURES)),
        keras.layers.Dense(INTERMEDIATE, activation="gelu", dtype=dtype),
        keras.layers.Dense(FEATURES, dtype=dtype),
    ])
    for theirs, ours in zip(ref.layers, denses):
        theirs.set_weights(ours.get_weights())
    if mode is not None:
        quantize(ffn, mode)
        quantize(ref, mode)
    if lora:
        for theirs, ours in zip(ref.layers, denses):
            ours.enable_lora(2)
            theirs.enable_lora(2)
            # LoRA's B starts at zero, which would hide a missing LoRA term.
            for name in ("lora_kernel_a", "lora_kernel_b"):
                value = rng.normal(size=getattr(ours, name).shape) * 0.5
                getattr(ours, name).assign(value)
                getattr(theirs, name).assign(value)
    return ffn, ref


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(2, LENGTH, FEATURES)).astype("float32"))
    dy = tf.constant(rng.normal(size=(2, LENGTH, FEATURES)).astype("float32"))
    return x, dy


def vjps(layer, x, dy, training):
    """Output and gradients (x, then trainable weights) of `layer(x)` with `dy`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
    return [y] + tape.gradient(
        y, [x] + layer.trainable_variables, output_gradients=tf.cast(dy, y.dtype))


def fused_vjps(ffn, x, dy, training):
    """The same through `value_and_vjp`, finished as a reversible stack does."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, targets, target_grads = ffn.value_and_vjp(x, dy, training=training)
    return [y] + tape.gradient(
        targets, [x] + ffn.trainable_variables, output_gradients=target_grads)


def assert_close(actual, expected, rtol, what=""):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, f"{what} [{i}] is None"
        a = np.asarray(tf.cast(a, tf.float32))
        e = np.asarray(tf.cast(e, tf.float32))
        assert a.shape == e.shape, f"{what} [{i}]"
        err = np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-6)
        assert err <= rtol, f"{what} [{i}]: relative error {err:.3g} > {rtol}"


def relative_difference(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# float32 throughout; the chunked path runs the same operations per position
# as the reference, only the sums over positions (weight gradients) are
# split over the slices.
RTOL = 1e-5


def check_quantized(ffn, mode):
    for dense in (ffn.intermediate_dense, ffn.output_dense):
        assert dense.quantization_mode == mode
        if mode in ("int8", "int4"):
            # int4 packs two values per int8.
            assert dense._kernel.dtype == "int8"
            assert not dense._kernel.trainable
        else:
            assert {"inputs_scale", "kernel_scale", "outputs_grad_scale"} <= {
                v.name for v in dense.variables}


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_outputs_equal_reference(mode):
    ffn, ref = make_pair(mode)
    check_quantized(ffn, mode)
    x, _ = data()
    expected = ref(x)
    float_ffn, _ = make_pair(None)
    # Quantization changes the network (else this test would show nothing).
    assert relative_difference(float_ffn(x), expected) > 1e-3
    assert_close([ffn(x), ffn(x, training=True)], [expected, ref(x, training=True)],
                 RTOL, "outputs")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_gradients_equal_reference(mode):
    ffn, ref = make_pair(mode)
    x, dy = data()
    expected = vjps(ref, x, dy, training=True)
    # Output, x and the two biases: the integer kernels are not trained.
    assert len(expected) == 4
    assert_close(vjps(ffn, x, dy, training=True), expected, RTOL, "call")
    assert_close(fused_vjps(ffn, x, dy, training=True), expected, RTOL, "value_and_vjp")


# Keras' float8 Dense has gradients in graph mode only (its custom gradient
# fails eagerly), so the float8 tests compare inside tf.function.
@pytest.mark.parametrize("training", [False, True])
def test_float8_gradients_equal_reference(training):
    ffn, ref = make_pair("float8")
    x, dy = data()

    @tf.function
    def run():
        ours = vjps(ffn, x, dy, training)
        fused = fused_vjps(ffn, x, dy, training)
        theirs = vjps(ref, x, dy, training)
        return ours, fused, theirs

    ours, fused, theirs = run()
    names = [v.name for v in ffn.trainable_variables]
    assert names == [v.name for v in ref.trainable_variables]
    weights = [i for i, name in enumerate(names) if name in ("kernel", "bias")]
    if training:
        # The plain network on the whole sequence: the statistics' new values
        # (their "gradients") are the reference's too.
        assert_close(ours, theirs, RTOL, "call")
        assert_close(fused, theirs, RTOL, "value_and_vjp")
        return
    # Slice by slice; the statistics are left as they are (no gradient).
    for grads in (ours, fused):
        assert all(grads[2 + i] is None for i in range(len(names)) if i not in weights)
    kept = [0, 1] + [2 + i for i in weights]
    for grads, what in ((ours, "call"), (fused, "value_and_vjp")):
        # The output and x: float32 alike.
        assert_close(grads[:2], theirs[:2], RTOL, what)
        # Keras rounds the float8 layer's bias to bfloat16 and back, so a
        # bias gradient is rounded to bfloat16 (2**-8) once per slice here,
        # once in all there.
        assert_close([grads[i] for i in kept[2:]], [theirs[i] for i in kept[2:]],
                     1e-2, what)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_lora_equals_reference(mode):
    ffn, ref = make_pair(mode, lora=True)
    names = sorted(v.name for v in ffn.trainable_variables)
    assert names == sorted(["bias", "lora_kernel_a", "lora_kernel_b"] * 2)
    x, dy = data()
    expected = vjps(ref, x, dy, training=True)
    assert_close(vjps(ffn, x, dy, training=True), expected, RTOL, "call")
    assert_close(fused_vjps(ffn, x, dy, training=True), expected, RTOL, "value_and_vjp")
    frozen = [ffn.intermediate_dense._kernel, ffn.output_dense._kernel]
    with tf.GradientTape() as tape:
        y = ffn(x, training=True)
    assert tape.gradient(y, frozen) == [None, None]


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_int8_in_graph_and_xla(jit, lora):
    ffn, ref = make_pair("int8", lora=lora)
    x, dy = data()

    @tf.function(jit_compile=jit)
    def run(x, dy):
        return (vjps(ffn, x, dy, True), fused_vjps(ffn, x, dy, True),
                vjps(ref, x, dy, True))

    ours, fused, theirs = run(x, dy)
    # XLA fuses differently in each program.
    rtol = 1e-5 if not jit else 1e-4
    assert_close(ours, theirs, rtol, "call")
    assert_close(fused, theirs, rtol, "value_and_vjp")


@pytest.mark.parametrize("dtype,mode,rtol", [
    # float16 and bfloat16 keep 11 and 8 significant bits; the gradients of
    # the float32 weights are summed per slice here, over all positions there.
    ("mixed_float16", None, 3e-3),
    ("mixed_bfloat16", "int8", 2e-2),
])
def test_mixed_precision_equals_reference(dtype, mode, rtol, monkeypatch):
    ffn, ref = make_pair(mode, lora=True, dtype=dtype)
    x, dy = data()
    # The slices' weight gradients are summed in the weights' dtype
    # (float32), not the compute dtype: the weights go in as float32.
    param_dtypes = []
    chunked_map = sequence_slices.chunked_map

    def spy(fn, x, params, chunk_size):
        param_dtypes.extend(p.dtype for p in params)
        return chunked_map(fn, x, params, chunk_size)

    monkeypatch.setattr(sequence_slices, "chunked_map", spy)

    # In graph mode: eagerly, Keras' int8 Dense with LoRA under mixed
    # precision fails to sum its input gradients (float32 + bfloat16).
    @tf.function
    def run():
        return (vjps(ffn, x, dy, True), fused_vjps(ffn, x, dy, True),
                vjps(ref, x, dy, True))

    ours, fused, theirs = run()
    assert param_dtypes and set(param_dtypes) == {tf.float32}
    for grads, what in ((ours, "call"), (fused, "value_and_vjp")):
        assert grads[0].dtype == theirs[0].dtype
        # The weights' gradients in the weights' dtype.
        assert [g.dtype for g in grads[2:]] == [tf.float32] * (len(grads) - 2)
        assert_close(grads, theirs, rtol, what)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_nested_in_a_stateless_scope(graph):
    """A caller's scope (a reversible stack's block weights) decides the values."""
    ffn, ref = make_pair("int8", lora=True)
    x, dy = data()
    rng = np.random.default_rng(11)
    # Other values for every variable the caller maps, kernels included.
    values = {}
    for ours, theirs in zip((ffn.intermediate_dense, ffn.output_dense), ref.layers):
        for variable, twin in zip(ours.variables, theirs.variables):
            assert variable.name == twin.name
            if variable.dtype == "int8":
                value = rng.integers(-127, 128, size=variable.shape)
            else:
                value = rng.normal(size=variable.shape) * 0.5 + 1.0
            value = tf.constant(value, dtype=variable.dtype)
            values[id(variable)] = value
            twin.assign(value)
    expected = vjps(ref, x, dy, training=True)
    mapped = [values[id(v)] for v in ffn.trainable_variables]
    mapping = [(v, values[id(v)]) for v in ffn.variables if id(v) in values]
    assert len(mapping) == len(values)

    def run(fused):
        with tf.GradientTape() as tape:
            tape.watch([x] + mapped)
            with keras.StatelessScope(state_mapping=mapping):
                if fused:
                    y, targets, target_grads = ffn.value_and_vjp(x, dy, training=True)
                else:
                    y = targets = ffn(x, training=True)
                    target_grads = dy
                if not graph:
                    # Eagerly, Keras' int8 Dense reads its kernel and scale
                    # when its gradient runs, so that has to be in the scope
                    # (as for the Dense layers alone).
                    return [y] + tape.gradient(
                        targets, [x] + mapped, output_gradients=target_grads)
        return [y] + tape.gradient(targets, [x] + mapped, output_gradients=target_grads)

    for fused in (False, True):
        grads = tf.function(run)(fused) if graph else run(fused)
        assert_close(grads, expected, RTOL, f"fused={fused}")
