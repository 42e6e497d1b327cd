"""Property-based tests of LSHAttention (hypothesis).

Random layer configurations (heads, widths, bucket sizes including 1,
hash rounds, plain and factorized bucket counts, chunk windows, sliding
windows, `value_shift`, biases, dtype policies) and random calls (batch
sizes, lengths from 1, below and not a multiple of the bucket size, input
dtypes, padding, every `attention_mask` form, causal or not; eager, graph or
XLA). Each property holds against the brute-force reference of
tests/lsh/lsh_reference.py, plain softmax attention, or an invariant.

The default run checks a few examples per property, the same ones at every
run (profile "default" in tests/conftest.py); the `slow` variants
(`-m slow`) draw thousands of fresh ones. A failure that hypothesis finds
is shrunk and kept as a regular test (`test_found_*` at the end).
"""

import dataclasses
import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from keras_reformer.layers import LSHAttention
from tests.lsh import lsh_reference as ref

FEATURES = 6
MAX_LENGTH = 40
# A bucket choice closer than this (relative) to a tie in the float64
# reference may differ in float32: such examples are left out.
HASH_MARGIN = 1e-4
# Compiled modes cost seconds an example: drawn one time in ten, and always
# in `test_compiled_outputs_match_reference`.
MODES = ("eager",) * 8 + ("graph", "xla")
COMPILED = ("graph", "xla")
POLICIES = ("float32", "float32", "float32", "float64", "mixed_float16",
            "mixed_bfloat16")
# Relative output tolerance per policy (mixed: float16 / bfloat16 outputs).
TOLERANCE = {"float32": 1e-4, "float64": 1e-4, "mixed_float16": 1e-2,
             "mixed_bfloat16": 6e-2}
BUCKETS = (4, 2, 6, 8, (2, 2), (2, 4), (4, 2), None)


def both_runs(default, slow):
    """A property as two tests: `default` examples in the default run,
    `slow` fresh ones under `-m slow` (`name` and `name_slow`)."""

    def wrap(check):
        fast = settings(max_examples=default)(given(data=st.data())(check))
        thorough = pytest.mark.slow(settings(
            settings.get_profile("slow"), max_examples=slow,
        )(given(data=st.data())(check)))
        return fast, thorough

    return wrap


# ----------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class Config:
    """LSHAttention's constructor arguments (hashable: layers are cached)."""

    num_heads: int = 2
    key_dim: int = 4
    value_dim: int = None
    use_bias: bool = True
    bucket_size: int = 4
    num_hashes: int = 2
    num_buckets: object = 4
    max_length: int = None
    num_chunks_before: int = 1
    num_chunks_after: int = 0
    sliding_window: int = None
    value_shift: bool = False
    seed: int = 0
    dtype: str = "float32"
    extra: tuple = ()  # other (name, value) arguments

    def kwargs(self):
        args = dataclasses.asdict(self)
        args.update(dict(args.pop("extra")))
        return args


@functools.lru_cache(maxsize=None)
def layer_for(config):
    """A layer built for any length, with weights drawn from its seed."""
    layer = LSHAttention(**config.kwargs())
    layer.build((None, None, FEATURES))
    rng = np.random.default_rng(config.seed)
    layer.set_weights([
        w if w.dtype.kind == "i" else rng.normal(size=w.shape).astype(w.dtype)
        for w in layer.get_weights()
    ])
    return layer


@st.composite
def configs(draw, causal, policies=("float32",), value_shift=None, extra=()):
    """(Config, causal); `causal`: a strategy of booleans."""
    causal = draw(causal)
    if value_shift is None:
        value_shift = causal and draw(st.booleans())
    config = Config(
        num_heads=draw(st.integers(1, 2)),
        key_dim=draw(st.sampled_from([4, 2, 8])),
        value_dim=draw(st.sampled_from([None, 3])),
        use_bias=draw(st.booleans()),
        bucket_size=draw(st.integers(1, 8)),
        num_hashes=draw(st.integers(1, 4)),
        num_buckets=draw(st.sampled_from(BUCKETS)),
        max_length=draw(st.sampled_from([None, 24])),
        num_chunks_before=draw(st.integers(0, 2)),
        num_chunks_after=draw(st.integers(0, 2)),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 12))),
        value_shift=value_shift,
        seed=draw(st.integers(0, 3)),
        dtype=draw(st.sampled_from(policies)),
        extra=extra,
    )
    note(f"config={config}, causal={causal}")
    return config, causal


# ----------------------------------------------------------------- inputs


def draw_inputs(data, batch=None, length=None, dtypes=("float32",)):
    batch = batch or data.draw(st.integers(1, 3), "batch")
    length = length or data.draw(st.integers(1, MAX_LENGTH), "length")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "x seed"))
    dtype = data.draw(st.sampled_from(dtypes), "input dtype")
    return rng.normal(size=(batch, length, FEATURES)).astype(dtype)


def draw_padding(data, batch, length):
    """None or a (B, L) bool mask of real positions, shrinking to all real."""
    if not data.draw(st.booleans(), "padded"):
        return None
    padded = data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length),
                                min_size=batch, max_size=batch), "padding")
    return ~np.array(padded, bool)


def draw_attention_mask(data, batch, heads, length, valid):
    """None or an `attention_mask` in one of MultiHeadAttention's shapes."""
    kind = data.draw(st.sampled_from(
        ["none", "keys", "keys_full", "keys_heads", "pair", "pair_shared",
         "pair_one", "pair_heads", "pair_one_head", "tril", "tril_padded"]), "mask")
    keys = np.ones((batch, length), bool) if valid is None else valid
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "mask seed"))
    density = data.draw(st.sampled_from([0.8, 0.5, 0.95]), "mask density")

    def pairs(*shape):
        return rng.random(shape + (length, length)) < density

    tril = np.tri(length, dtype=bool)
    return {
        "none": lambda: None,
        "keys": lambda: keys[:, None, :],
        "keys_full": lambda: np.repeat(keys[:, None, :], length, 1),
        "keys_heads": lambda: np.broadcast_to(keys[:, None, None, :],
                                              (batch, heads, length, length)),
        "pair": lambda: pairs(batch),
        "pair_shared": lambda: pairs(),
        "pair_one": lambda: pairs(1),
        "pair_heads": lambda: pairs(batch, heads),
        "pair_one_head": lambda: pairs(batch, 1),
        "tril": lambda: tril,
        "tril_padded": lambda: tril & keys[:, None, :],
    }[kind]()


def broadcast_pair(mask, batch, heads, length):
    """An MHA attention mask -> (B, H, L, L), as MHA expands it."""
    mask = np.asarray(mask, bool)
    while mask.ndim < 4:
        mask = np.expand_dims(mask, -3)
    return np.broadcast_to(mask, (batch, heads, length, length))


def call_kwargs(causal, valid, attention_mask):
    kwargs = {"use_causal_mask": causal}
    if valid is not None:
        kwargs["query_mask"] = valid
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return kwargs


def call(layer, x, kwargs, mode="eager"):
    if mode == "eager":
        return layer(x, **kwargs)
    fn = tf.function(lambda x: layer(x, **kwargs), jit_compile=mode == "xla")
    return fn(tf.constant(x))


# -------------------------------------------------------------- reference


@dataclasses.dataclass
class Expected:
    """The reference's view of one call."""

    valid: np.ndarray  # (B, L) the real positions (keys some query may see)
    checked: np.ndarray  # (B, L) positions whose output is specified
    allowed: np.ndarray  # (B, H, R, L, L)
    shift: np.ndarray  # None or (B, L, L)
    output: np.ndarray  # (B, L, features) float64


def projections(layer, x):
    """qk, v (B, H, L, .) float64; mixed policies: the layer's own (Keras)
    projections, whose float16 rounding the reference cannot repeat."""
    if layer.dtype_policy.name.startswith("mixed"):
        qk, v = (np.asarray(tf.cast(d(x), tf.float64)).transpose(0, 2, 1, 3)
                 for d in (layer.qk_dense, layer.value_dense))
        return qk, v
    return ref.projections(layer, x)


def reference(layer, x, kwargs):
    """The brute-force output of `layer(x, **kwargs)`; rejects (`assume`)
    the examples where float rounding may move a real position's bucket."""
    batch, length = x.shape[:2]
    heads = layer.num_heads
    valid = np.ones((batch, length), bool)
    if kwargs.get("query_mask") is not None:
        valid &= kwargs["query_mask"]
    pair = None
    if kwargs.get("attention_mask") is not None:
        pair = broadcast_pair(kwargs["attention_mask"], batch, heads, length)
        valid &= pair.any(axis=(1, 2))  # a key no query may see is padding
    qk, v = projections(layer, x.astype(np.float64))
    factors = layer._factors()
    rotations = [np.asarray(r) for r in layer._rotations(factors, layer.num_hashes, False)]
    margins = ref.hash_margins(qk, rotations)
    assume(np.all(margins[np.broadcast_to(valid[:, None, None], margins.shape)]
                  > HASH_MARGIN))
    buckets, n_buckets = ref.buckets_from_rotations(qk, rotations)
    settings_ = dict(
        before=layer.num_chunks_before, after=layer.num_chunks_after,
        causal=kwargs["use_causal_mask"], sliding_window=layer.sliding_window,
        pair=pair,
    )
    allowed = ref.allowed_masks(buckets, n_buckets, valid, layer.bucket_size,
                                strict=layer.value_shift, **settings_)
    attended = ref.lsh_reference(qk, v, buckets, n_buckets, valid, layer.bucket_size,
                                 value_shift=layer.value_shift, **settings_)
    # A query with no allowed key in any round (of some head: the heads
    # share the output projection) has no specified output, except with
    # shifted values (zeros).
    checked = valid & (layer.value_shift | allowed.any(axis=(2, 4)).all(axis=1))
    shift = ref.shift_matrix(valid) if layer.value_shift else None
    return Expected(valid, checked, allowed, shift, ref.output_projection(layer, attended))


def assert_close(got, want, tolerance, where=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if where is not None:
        got, want = got[where], want[where]
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * scale)


# ---------------------------------------------------------------- properties


def outputs_match_reference(data, modes):
    """(a) Outputs equal the brute-force reference: every mask form, every
    dtype policy, input dtype and execution mode."""
    config, causal = data.draw(configs(st.booleans(), POLICIES))
    layer = layer_for(config)
    x = draw_inputs(data, dtypes=("float32", "float64", "float16"))
    batch, length = x.shape[:2]
    valid = draw_padding(data, batch, length)
    mask = None if config.value_shift else draw_attention_mask(
        data, batch, config.num_heads, length, valid)
    kwargs = call_kwargs(causal, valid, mask)
    mode = data.draw(st.sampled_from(modes), "mode")
    expected = reference(layer, x, kwargs)
    got = call(layer, x, kwargs, mode)
    assert got.dtype == layer.compute_dtype
    assert_close(got, expected.output, TOLERANCE[config.dtype], expected.checked)


@both_runs(default=10, slow=500)
def check_outputs_match_reference(data):
    outputs_match_reference(data, MODES)


test_outputs_match_reference, test_outputs_match_reference_slow = (
    check_outputs_match_reference)


@both_runs(default=2, slow=60)
def check_compiled_outputs_match_reference(data):
    outputs_match_reference(data, COMPILED)


test_compiled_outputs_match_reference, test_compiled_outputs_match_reference_slow = (
    check_compiled_outputs_match_reference)


def layer_weights(layer):
    """(qk kernel, qk bias, value kernel, value bias, output kernel, output
    bias) variables, biases None without `use_bias`."""
    return [getattr(dense, name, None)
            for dense in (layer.qk_dense, layer.value_dense, layer.output_dense)
            for name in ("kernel", "bias")]


@both_runs(default=5, slow=400)
def check_gradients_match_reference(data):
    """(a) Gradients with respect to the input and every weight equal the
    autodiff gradients of the float64 reference."""
    config, causal = data.draw(configs(st.booleans(), ("float32", "float64")))
    layer = layer_for(config)
    x = draw_inputs(data)
    batch, length = x.shape[:2]
    valid = draw_padding(data, batch, length)
    mask = None if config.value_shift else draw_attention_mask(
        data, batch, config.num_heads, length, valid)
    kwargs = call_kwargs(causal, valid, mask)
    expected = reference(layer, x, kwargs)
    rng = np.random.default_rng(length)
    target = rng.normal(size=expected.output.shape) * expected.checked[..., None]
    variables = layer_weights(layer)
    present = [v for v in variables if v is not None]

    def layer_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, **kwargs)
            loss = tf.reduce_sum(tf.cast(out, tf.float64) * target)
        return tape.gradient(loss, [x] + present)

    mode = data.draw(st.sampled_from(MODES), "mode")
    if mode != "eager":
        layer_gradients = tf.function(layer_gradients, jit_compile=mode == "xla")
    got = layer_gradients(tf.constant(x, layer.compute_dtype))

    x64 = tf.constant(x, tf.float64)
    weights = [None if v is None else tf.constant(np.asarray(v), tf.float64)
               for v in variables]
    watched = [x64] + [w for w in weights if w is not None]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        loss = ref.dense_lsh_loss_tf(weights, x64, expected.allowed, target,
                                     expected.shift)
    want = [np.asarray(w) for w in tape.gradient(loss, watched)]
    # float32 rounding relative to each gradient, and to the largest one
    # (a gradient that is exactly zero in float64, e.g. of the qk weights
    # when every query sees only itself, is rounding noise in float32).
    overall = max(np.abs(w).max() for w in want)
    for variable, g, w in zip(["x"] + [v.path for v in present], got, want):
        g = np.zeros(w.shape) if g is None else np.asarray(g, np.float64)
        error = np.abs(g - w).max()
        bound = 2e-4 * np.abs(w).max() + 2e-5 * overall
        assert error <= bound, f"{variable}: error {error:.2e} > {bound:.2e}"


test_gradients_match_reference, test_gradients_match_reference_slow = (
    check_gradients_match_reference)


@both_runs(default=6, slow=300)
def check_full_window_is_softmax_attention(data):
    """(b) When every chunk window covers the whole input (non-causal),
    LSH attention is plain shared-QK softmax attention, whatever the
    buckets: with padding, a sliding window or an all-True mask too (which
    take the hashed path instead of the dense one)."""
    config, _ = data.draw(configs(st.just(False), value_shift=False))
    config = dataclasses.replace(config, sliding_window=None)
    reach = min(config.num_chunks_before, config.num_chunks_after) + 1
    length = data.draw(st.integers(1, reach * config.bucket_size), "length")
    x = draw_inputs(data, length=length)
    batch = x.shape[0]
    valid = draw_padding(data, batch, length)
    extra = data.draw(st.sampled_from(["none", "window", "mask"]), "hashed path")
    if extra == "window":
        config = dataclasses.replace(
            config, sliding_window=data.draw(st.integers(length, length + 3)))
    layer = layer_for(config)
    mask = np.ones((length, length), bool) if extra == "mask" else None
    kwargs = call_kwargs(False, valid, mask)
    got = call(layer, x, kwargs, data.draw(st.sampled_from(MODES), "mode"))
    real = np.ones((batch, length), bool) if valid is None else valid
    qk, v = ref.projections(layer, x)
    want = ref.output_projection(layer, ref.full_shared_qk_attention(qk, v, real, False))
    assert_close(got, want, TOLERANCE["float32"], real)


test_full_window_is_softmax_attention, test_full_window_is_softmax_attention_slow = (
    check_full_window_is_softmax_attention)


@both_runs(default=6, slow=500)
def check_padding_never_changes_real_outputs(data):
    """(c) Appending padded positions (any values, marked by the padding
    mask) leaves every real position's output unchanged."""
    config, causal = data.draw(configs(st.booleans()))
    layer = layer_for(config)
    x = draw_inputs(data)
    batch, length = x.shape[:2]
    valid = draw_padding(data, batch, length)
    real = np.ones((batch, length), bool) if valid is None else valid
    extra = data.draw(st.integers(1, 12), "appended")
    junk = draw_inputs(data, batch, extra) * data.draw(st.sampled_from([1.0, 100.0]))
    longer = np.concatenate([x, junk], 1)
    long_valid = np.concatenate([real, np.zeros((batch, extra), bool)], 1)
    as_mask = not config.value_shift and data.draw(st.booleans(), "as attention_mask")
    if as_mask:
        long_kwargs = call_kwargs(causal, None, long_valid[:, None, :])
    else:
        long_kwargs = call_kwargs(causal, long_valid, None)
    short = layer(x, **call_kwargs(causal, valid, None))
    long = call(layer, longer, long_kwargs, data.draw(st.sampled_from(MODES), "mode"))
    assert np.all(np.isfinite(np.asarray(long)))
    assert_close(np.asarray(long)[:, :length], short, 1e-5, real)


test_padding_never_changes_real_outputs, test_padding_never_changes_real_outputs_slow = (
    check_padding_never_changes_real_outputs)


@both_runs(default=6, slow=500)
def check_causal_outputs_ignore_later_tokens(data):
    """(d) Causal attention (`use_causal_mask` or a lower-triangular mask):
    changing the tokens after t never changes the outputs up to t, in
    inference and in training (the same rotations)."""
    config, _ = data.draw(configs(st.just(True)))
    layer = layer_for(config)
    x = draw_inputs(data)
    batch, length = x.shape[:2]
    assume(length > 1)
    t = data.draw(st.integers(0, length - 2), "t")
    valid = draw_padding(data, batch, length)
    tril = not config.value_shift and data.draw(st.booleans(), "lower-triangular mask")
    kwargs = (call_kwargs(False, valid, np.tri(length, dtype=bool)) if tril
              else call_kwargs(True, valid, None))
    training = data.draw(st.booleans(), "training")
    changed = x.copy()
    changed[:, t + 1:] = draw_inputs(data, batch, length - t - 1)
    state = np.asarray(layer.seed_generator.state)
    outs = []
    for inputs in (x, changed):
        layer.seed_generator.state.assign(state)  # the same rotations
        outs.append(np.asarray(layer(inputs, training=training, **kwargs)))
    real = np.ones((batch, length), bool) if valid is None else valid
    np.testing.assert_allclose(outs[0][:, : t + 1][real[:, : t + 1]],
                               outs[1][:, : t + 1][real[:, : t + 1]], atol=1e-5)


test_causal_outputs_ignore_later_tokens, test_causal_outputs_ignore_later_tokens_slow = (
    check_causal_outputs_ignore_later_tokens)


@both_runs(default=4, slow=200)
def check_cached_decoding_equals_full_pass(data):
    """(e) One token at a time from the cache of a right-padded prompt
    batch equals the full causal pass at every decoded position."""
    config, _ = data.draw(configs(st.just(True)))
    layer = layer_for(config)
    batch = data.draw(st.integers(1, 3), "batch")
    prompt = data.draw(st.integers(1, 12), "prompt")
    total = prompt + data.draw(st.integers(1, 14), "decoded")
    lengths = np.array(data.draw(st.lists(st.integers(1, prompt), min_size=batch,
                                          max_size=batch), "prompt lengths"))
    x = draw_inputs(data, batch, total)
    full = np.asarray(layer(x, use_causal_mask=True))
    valid = np.arange(prompt)[None] < lengths[:, None]
    cache = layer.init_cache(x[:, :prompt], tf.constant(valid), total)
    rotations = layer.inference_rotations()
    step = layer.call_with_cache
    if data.draw(st.sampled_from(MODES), "mode") == "xla":
        step = tf.function(step, jit_compile=True)
    position = lengths.copy()
    while position.min() < total:
        index = np.minimum(position, total - 1)
        out, cache = step(x[np.arange(batch), index][:, None], cache,
                          tf.constant(index, tf.int32), rotations)
        for b in np.flatnonzero(position < total):
            np.testing.assert_allclose(np.asarray(out)[b, 0], full[b, position[b]],
                                       atol=1e-5, err_msg=f"row {b} at {position[b]}")
        position = position + 1


test_cached_decoding_equals_full_pass, test_cached_decoding_equals_full_pass_slow = (
    check_cached_decoding_equals_full_pass)


@both_runs(default=5, slow=300)
def check_config_round_trip(data):
    """(f) `from_config(get_config())` with the weights set gives the same
    config and the same outputs, for every argument."""
    extra = (
        ("use_gate", data.draw(st.booleans(), "use_gate")),
        ("output_shape", data.draw(st.sampled_from([None, 5, (2, 3)]), "output_shape")),
        ("dropout", data.draw(st.sampled_from([0.0, 0.1]), "dropout")),
        ("factorize_above", data.draw(st.sampled_from([256, 8]), "factorize_above")),
        ("kernel_initializer", data.draw(st.sampled_from(["glorot_uniform", "he_normal"]))),
    )
    config, causal = data.draw(configs(st.booleans(), POLICIES, extra=extra))
    layer = layer_for(config)
    clone = LSHAttention.from_config(layer.get_config())
    clone.build((None, None, FEATURES))
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    x = draw_inputs(data)
    valid = draw_padding(data, *x.shape[:2])
    kwargs = call_kwargs(causal, valid, None)
    np.testing.assert_array_equal(np.asarray(clone(x, **kwargs)),
                                  np.asarray(layer(x, **kwargs)))


test_config_round_trip, test_config_round_trip_slow = check_config_round_trip


def test_profiles_are_registered():
    assert settings.default.derandomize and settings.default.deadline is None
    assert not settings.get_profile("slow").derandomize
    assert keras.config.dtype_policy().name == "float32"


# ------------------------------------------- cases found, kept as regular tests


def test_found_shared_mask_causal_rule_per_batch_row():
    # A (T, T) mask shared by the batch, with per-row padding: on row 0's
    # real positions it admits no later key (the causal rule), on row 1's it
    # does (key 14 for query 12). The rule was decided once for the shared
    # mask over the union of the rows' real positions, so row 0's outputs
    # depended on row 1. Now each row follows its own rule.
    layer = layer_for(Config(num_heads=1, bucket_size=2, num_hashes=2,
                             num_chunks_after=1))
    length = 16
    x = np.random.default_rng(0).normal(size=(2, length, FEATURES)).astype("float32")
    mask = np.tri(length, dtype=bool)
    mask[12, 14] = True
    valid = np.ones((2, length), bool)
    valid[0, 12:] = False
    both = np.asarray(layer(x, query_mask=valid, attention_mask=mask))
    alone = np.asarray(layer(x[:1], query_mask=valid[:1], attention_mask=mask))
    causal = np.asarray(layer(x[:1], query_mask=valid[:1], use_causal_mask=True))
    # float32 outputs up to ~16: a batch of one and of two may round apart
    # by an ulp or two (a wrong rule changes them by far more).
    np.testing.assert_allclose(both[0, :12], alone[0, :12], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(alone[0, :12], causal[0, :12], rtol=1e-6, atol=1e-6)
