"""ReversibleSequence against a residual stack written out by hand."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ReversibleSequence
from keras_reformer.layers._reversible_engine import PerBlockRunner, TemplateRunner
from tests.layers.blocks import PACKAGE, AttentionBlock, FeedForwardBlock, UserAttentionBlock

FEATURES = 8


@pytest.fixture(autouse=True)
def fixed_initial_weights():
    # Weight initializers draw from the global seed: fix it, so that every
    # run compares the same numbers (float32 rounding differs with weights).
    keras.utils.set_random_seed(1234)


def reformer_blocks(depth, dropout=0.1, dtype=None, attention=None):
    attention = attention or AttentionBlock
    return [
        (
            attention(dropout, seed=10 * i, dtype=dtype),
            FeedForwardBlock(dropout, seed=10 * i + 5, dtype=dtype),
        )
        for i in range(depth)
    ]


def hand_written_stack(blocks, x1, x2, training, mask=None, mask_to_g=False):
    """The plain residual stack, y1 = x1 + f(x2), y2 = x2 + g(y1), autodiff."""
    f_kwargs = {} if mask is None else {"mask": mask}
    g_kwargs = f_kwargs if mask_to_g else {}
    for f, g in blocks:
        x1 = x1 + f(x2, training=training, **f_kwargs)
        x2 = x2 + g(x1, training=training, **g_kwargs)
    return x1, x2


def inputs(batch, length, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(rng.normal(size=(batch, length, FEATURES)).astype(dtype))
        for _ in range(2)
    ]


def padding(batch, length):
    mask = np.ones((batch, length), bool)
    mask[0, length - 5:] = False
    return tf.constant(mask)


class SeedStates:
    """Resets every SeedGenerator state in some layers to its value now."""

    def __init__(self, layers):
        self.variables = []
        for layer in layers:
            self.variables += [
                v for v in layer.variables if v.path.endswith("seed_generator_state")
            ]
        self.values = [v.numpy() for v in self.variables]

    def reset(self):
        for v, value in zip(self.variables, self.values):
            v.assign(value)


def loss_of(y1, y2):
    y1, y2 = tf.cast(y1, tf.float32), tf.cast(y2, tf.float32)
    length = tf.shape(y1)[1]
    w = tf.reshape(tf.cos(tf.range(length * FEATURES, dtype=tf.float32)),
                   (1, length, FEATURES))
    return tf.reduce_sum(y1 * w) + tf.reduce_sum(tf.sin(y2) * y1)


def gradients(stack_fn, weights, x1, x2):
    with tf.GradientTape() as tape:
        tape.watch([x1, x2])
        loss = loss_of(*stack_fn(x1, x2))
    return [loss] + tape.gradient(loss, [x1, x2] + weights)


def wrap(mode, fn):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "jit"))


def relative_error(actual, expected):
    """max |a - e| / max |e|, per tensor."""
    a = np.asarray(tf.cast(actual, tf.float32))
    e = np.asarray(tf.cast(expected, tf.float32))
    assert a.shape == e.shape
    return np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-6)


def assert_all_close(actual, expected, rtol, names=None):
    names = names or [str(i) for i in range(len(expected))]
    assert len(actual) == len(expected)
    worst = 0.0
    for name, a, e in zip(names, actual, expected):
        assert a is not None and e is not None, f"{name}: gradient is None"
        err = relative_error(a, e)
        worst = max(worst, err)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"
    return worst


def built_stack(blocks, reversible=True, **kwargs):
    # Each block's own variables (the layout these tests compare with the
    # blocks called by hand); tests/layers/test_stacked_weights.py covers
    # the stacked layout that "auto" gives identical blocks.
    kwargs.setdefault("stack_weights", False)
    stack = ReversibleSequence(blocks, reversible=reversible, **kwargs)
    stack.build([(None, None, FEATURES)] * 2)
    return stack


# ------------------------------------------------------------- the function


def test_forward_equals_hand_written_stack():
    blocks = reformer_blocks(3, attention=UserAttentionBlock)
    x1, x2 = inputs(2, 13)
    mask = padding(2, 13)
    stacks = [built_stack(blocks, reversible=True)]
    # Built by tracing: every block holds its variables before any call.
    assert all(f.built and len(f.trainable_variables) == 2 + 6 for f, _ in blocks)
    stacks.append(built_stack(blocks, reversible=False))
    expected = hand_written_stack(blocks, x1, x2, training=False, mask=mask)
    for stack in stacks:
        got = stack([x1, x2], mask=[mask, mask])
        assert_all_close(got, expected, 1e-6)
        assert len(got) == 2 and got[0].shape == x1.shape


@pytest.mark.parametrize("mode,depth,loop", [
    ("eager", 6, "auto"),
    ("graph", 3, "auto"),
    ("graph", 2, False),
    ("jit", 2, "auto"),
    # Unrolled under XLA (~30 s): its two halves are the unrolled graph case
    # and the looped XLA case above.
    pytest.param("jit", 2, False, marks=pytest.mark.slow),
    # Compiling 6 blocks twice takes ~45 s on 2 cores.
    pytest.param("jit", 6, False, marks=pytest.mark.slow),
    # The unrolled path at depth 6 in graph mode (~25 s); depth 2 above.
    pytest.param("graph", 6, False, marks=pytest.mark.slow),
])
def test_gradients_equal_autodiff_with_dropout_and_lsh(mode, depth, loop):
    """Dropout everywhere, training, LSH, a padding mask: every gradient.

    `loop="auto"` runs these identical blocks as one loop body over stacked
    weights; `False` unrolls them."""
    blocks = reformer_blocks(depth, dropout=0.2)
    stack = built_stack(blocks, loop_blocks=loop)
    plain = built_stack(blocks, reversible=False)
    weights = stack.trainable_variables
    assert len(weights) == depth * (2 + 6 + 2 + 4)
    seeds = SeedStates([stack])
    assert len(seeds.variables) == depth * 3  # LSH, FFN and Dropout per block
    x1, x2 = inputs(2, 20, seed=1)
    mask = padding(2, 20)

    def run(layer):
        def stack_fn(a, b):
            return layer([a, b], mask=[mask, mask], training=True)
        return wrap(mode, lambda a, b: gradients(stack_fn, weights, a, b))

    def by_hand(a, b):
        return hand_written_stack(blocks, a, b, training=True, mask=mask)

    names = ["loss", "x1", "x2"] + [v.path for v in weights]
    seeds.reset()
    expected = run(plain)(x1, x2)
    if mode == "eager":
        # reversible=False (unrolled, per-block weights) is ordinary autodiff
        # of the stack written out by hand. The same Python runs in graph
        # mode and under XLA; the looped non-reversible path is checked
        # against a hand-written stack in graph mode by test_stacked_weights.
        seeds.reset()
        by_hand_grads = wrap(mode, lambda a, b: gradients(by_hand, weights, a, b))(
            x1, x2)
        assert_all_close(expected, by_hand_grads, 1e-5, names)
    seeds.reset()
    worst = assert_all_close(run(stack)(x1, x2), expected, 1e-5, names)
    print(f"{mode}: worst relative gradient error {worst:.2g}")


@pytest.mark.parametrize("loop", [False, True])
def test_replay_matters(loop):
    """Without the seed replay the gradients are wrong: the test above can fail."""
    blocks = reformer_blocks(2, dropout=0.3)
    stack = built_stack(blocks, loop_blocks=loop)
    seeds = SeedStates([stack])
    weights = stack.trainable_variables
    x1, x2 = inputs(1, 12, seed=2)
    fn = tf.function(lambda a, b: gradients(
        lambda u, v: stack([u, v], training=True), weights, a, b))
    seeds.reset()
    good = fn(x1, x2)

    if loop:
        # The loop's backward reads the states as they are after the forward.
        owner = TemplateRunner

        def no_replay(self, recorded):
            return self.read()
    else:
        # Each half reruns on its layers' advanced seed states.
        owner = PerBlockRunner

        def no_replay(self, snapshots):
            return {key: [] for key in snapshots}

    attribute = "_replayed"
    original = owner.__dict__[attribute]  # as stored: staticmethod stays one
    setattr(owner, attribute, no_replay)
    try:
        seeds.reset()
        bad = tf.function(lambda a, b: gradients(
            lambda u, v: stack([u, v], training=True), weights, a, b))(x1, x2)
    finally:
        setattr(owner, attribute, original)
    with pytest.raises(AssertionError):
        assert_all_close(bad, good, 1e-3)


def test_user_dropout_block():
    """A user's own block with keras.layers.Dropout(0.3)."""
    def block(seed):
        return keras.Sequential([
            keras.layers.Dense(FEATURES, activation="tanh"),
            keras.layers.Dropout(0.3, seed=seed),
        ])

    blocks = [(block(1), block(2)), (block(3), block(4))]
    stack = built_stack(blocks)
    weights = stack.trainable_variables
    seeds = SeedStates([stack])
    assert len(seeds.variables) == 4
    x1, x2 = inputs(3, 7, seed=3)

    def by_hand(a, b):
        return hand_written_stack(blocks, a, b, training=True)

    seeds.reset()
    expected = tf.function(lambda a, b: gradients(by_hand, weights, a, b))(x1, x2)
    seeds.reset()
    got = tf.function(lambda a, b: gradients(
        lambda u, v: stack([u, v], training=True), weights, a, b))(x1, x2)
    assert_all_close(got, expected, 1e-5)
    # Dropout was active: without it the gradient differs.
    inference = tf.function(lambda a, b: gradients(
        lambda u, v: stack([u, v], training=False), weights, a, b))(x1, x2)
    with pytest.raises(AssertionError):
        assert_all_close(inference, expected, 1e-3)


def test_inputs_reconstructed_over_12_blocks():
    blocks = reformer_blocks(12)
    stack = built_stack(blocks)
    x1, x2 = inputs(2, 24, seed=4)
    mask = padding(2, 24)
    y1, y2 = stack([x1, x2], mask=[mask, mask])
    r1, r2 = stack.inverse([y1, y2], mask=mask)
    scale = float(tf.reduce_max(tf.abs(y1)))
    assert scale > 1
    np.testing.assert_allclose(r1, x1, atol=1e-5 * scale)
    np.testing.assert_allclose(r2, x2, atol=1e-5 * scale)


def test_any_batch_and_length_in_graph_mode():
    blocks = reformer_blocks(2)
    stack = built_stack(blocks)
    plain = built_stack(blocks, reversible=False)
    weights = stack.trainable_variables
    spec = tf.TensorSpec((None, None, FEATURES), tf.float32)

    def make(layer):
        return tf.function(
            lambda a, b: gradients(lambda u, v: layer([u, v]), weights, a, b),
            input_signature=[spec, spec],
        )

    ours, ref = make(stack), make(plain)
    for batch, length in [(1, 5), (3, 17)]:
        x1, x2 = inputs(batch, length, seed=length)
        assert_all_close(ours(x1, x2), ref(x1, x2), 1e-5)


def test_xla_keeps_the_recomputation():
    """XLA must not merge the recomputation with the forward pass (CSE).

    Two blocks of tanh(Dense): the forward has 4 matmuls, the backward per
    block recomputes 2 and takes 4 gradient matmuls: 16 in all. Merged
    (no recomputation), the count drops to 15 (checked by removing the
    barrier and gradient dependency); plain autodiff has 12. Run as one loop
    body (`loop_blocks=True`), the program holds each computation once: 2
    forward matmuls, and backward 2 recomputed plus 4 gradient matmuls.
    """
    def dots(reversible, loop=False):
        keras.utils.set_random_seed(0)
        blocks = [
            tuple(keras.layers.Dense(FEATURES, use_bias=False, activation="tanh")
                  for _ in range(2))
            for _ in range(2)
        ]
        stack = built_stack(blocks, reversible, loop_blocks=loop)
        x1, x2 = inputs(2, 5)

        @tf.function(jit_compile=True)
        def step(a, b):
            return gradients(lambda u, v: stack([u, v]), stack.trainable_variables,
                             a, b)

        hlo = step.experimental_get_compiler_ir(x1, x2)(stage="optimized_hlo")
        return len(re.findall(r"= [^=\n]*\bdot\(", hlo))

    assert dots(False) == 12
    assert dots(True) == 16
    assert dots(True, loop=True) == 8
    # The same count without the ordering tricks shows what they prevent.
    from keras_reformer.ops import recompute as rev_ops

    saved = rev_ops.barrier, rev_ops.gradient_dependency
    rev_ops.barrier = rev_ops.gradient_dependency = lambda tensors, *_: list(tensors)
    try:
        assert dots(True) == 15
    finally:
        rev_ops.barrier, rev_ops.gradient_dependency = saved


# ------------------------------------------------------------- training


def small_model(jit, run_eagerly, length=16, depth=2, dropout=0.1):
    """Embedding (padding mask) -> [x, x] -> stack -> concat -> Dense, a toy task."""
    keras.utils.set_random_seed(1)
    ids = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(20, FEATURES, mask_zero=True)(ids)
    y1, y2 = ReversibleSequence(reformer_blocks(depth, dropout))([x, x])
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([y1, y2]))
    model = keras.Model(ids, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse",
                  jit_compile=jit, run_eagerly=run_eagerly)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 20, size=(32, length))
    data[:, -3:] = 0  # padding
    target = np.cumsum(data % 3 == 0, axis=1)[..., None].astype("float32") / 4
    return model, data, target


@pytest.mark.slow  # ~16 s; fit under XLA through the stack: test_reformer_backbone::test_fit_with_jit_lowers_loss, test_mixed_precision_fit_jit
def test_fit_jit_compile_lowers_loss():
    model, x, y = small_model(jit=True, run_eagerly=False, length=12)
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=6, batch_size=8, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.7 * before, (before, after)


def test_fit_run_eagerly():
    model, x, y = small_model(jit=False, run_eagerly=True)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    blocks = reformer_blocks(1, dropout=0.2, dtype=policy)
    stack = built_stack(blocks, dtype=policy)
    plain = built_stack(blocks, reversible=False, dtype=policy)
    weights = stack.trainable_variables
    assert all(v.dtype == "float32" for v in weights)
    seeds = SeedStates([stack])
    x1, x2 = inputs(2, 16, seed=5)
    y = stack([x1, x2], training=True)
    assert y[0].dtype == stack.compute_dtype
    results = []
    for layer in (stack, plain):
        seeds.reset()
        results.append(tf.function(lambda a, b: gradients(
            lambda u, v: layer([u, v], training=True), weights, a, b))(x1, x2))
    for g in results[0]:
        assert np.isfinite(np.asarray(tf.cast(g, tf.float32))).all()
    # The two paths round in a different order: a few units of the compute
    # dtype's last place (float16 keeps 11 significant bits, bfloat16 8).
    assert_all_close(results[0], results[1], 2e-2 if policy == "mixed_float16" else 6e-2)


def test_mixed_precision_fit_jit():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model, x, y = small_model(jit=True, run_eagerly=False, length=8, depth=1)
        history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


# ------------------------------------------------------------- masks


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedScale(keras.layers.Layer):
    """Multiplies by a weight and zeroes masked positions; records its mask."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x, mask=None):
        self.seen_mask = mask
        if mask is not None:
            x = x * tf.cast(mask, x.dtype)[..., None]
        return tf.tanh(x * self.w)


@pytest.mark.parametrize("loop", [False, True])
def test_mask_reaches_blocks_and_output(loop):
    emb = keras.layers.Embedding(10, FEATURES, mask_zero=True)
    ids = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 0]])
    x = emb(ids)
    blocks = [(MaskedScale(), MaskedScale()), (MaskedScale(), MaskedScale())]
    stack = ReversibleSequence(blocks, loop_blocks=loop)
    y1, y2 = stack([x, x])
    # Looped, block 0's layers run every block (with the other blocks'
    # weights); the comparison with the stack by hand below covers them all.
    called = stack.blocks[:1] if loop else stack.blocks
    for layer in [layer for pair in called for layer in pair]:
        np.testing.assert_array_equal(layer.seen_mask, ids != 0)
    np.testing.assert_array_equal(y1._keras_mask, ids != 0)
    np.testing.assert_array_equal(y2._keras_mask, ids != 0)
    expected = hand_written_stack(blocks, x, x, training=None,
                                  mask=tf.constant(ids != 0), mask_to_g=True)
    assert_all_close([y1, y2], expected, 1e-6)


# ------------------------------------------------------------- Keras citizen


def test_weights_tracked_and_shapes():
    blocks = reformer_blocks(2)
    stack = built_stack(blocks)
    expected = sum(len(f.trainable_weights) + len(g.trainable_weights)
                   for f, g in blocks)
    assert len(stack.trainable_weights) == expected
    assert set(map(id, stack._flatten_layers(include_self=False))) >= {
        id(layer) for pair in blocks for layer in pair
    }
    assert stack.supports_masking
    shape = (3, 11, FEATURES)
    assert stack.compute_output_shape([shape, shape]) == [shape, shape]
    assert stack.compute_mask([None, None], None) is None
    assert stack.blocks == [tuple(b) for b in blocks]


def test_config_round_trip():
    blocks = reformer_blocks(2)
    stack = built_stack(blocks, reversible=True, name="stack")
    config = stack.get_config()
    assert config["reversible"] is True and len(config["blocks"]) == 2
    clone = ReversibleSequence.from_config(config)
    assert clone.get_config() == config
    clone.build([(None, None, FEATURES)] * 2)
    clone.set_weights(stack.get_weights())
    x1, x2 = inputs(1, 9)
    assert_all_close(clone([x1, x2]), stack([x1, x2]), 1e-6)


def test_keras_file_round_trip(tmp_path):
    model, x, _ = small_model(jit=False, run_eagerly=False)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    stacks = [la for la in loaded.layers if isinstance(la, ReversibleSequence)]
    assert len(stacks) == 1 and len(stacks[0].blocks) == 2


# ------------------------------------------------------------- bad input


class Widen(keras.layers.Layer):
    def call(self, x):
        return tf.concat([x, x], axis=-1)


def test_block_that_changes_shape():
    blocks = [(keras.layers.Dense(FEATURES), keras.layers.Dense(FEATURES)),
              (keras.layers.Dense(FEATURES), keras.layers.Dense(3))]
    with pytest.raises(ValueError, match=r"Block 1 \(g=.*\(None, None, 8\).*3"):
        built_stack(blocks)
    with pytest.raises(ValueError, match=r"Block 0 \(f="):
        ReversibleSequence([(Widen(), keras.layers.Dense(FEATURES))])(
            inputs(1, 4))


def test_blocks_not_pairs():
    dense = keras.layers.Dense(4)
    with pytest.raises(ValueError, match="single pair"):
        ReversibleSequence((dense, dense))
    with pytest.raises(ValueError, match=r"Block 1 must be a pair"):
        ReversibleSequence([(dense, dense), (dense,)])
    with pytest.raises(ValueError, match=r"Block 0: `g` must be a Keras layer"):
        ReversibleSequence([(dense, "relu")])
    with pytest.raises(ValueError, match="list of"):
        ReversibleSequence(dense)
    with pytest.raises(ValueError, match=r"at least one.*Received: blocks=\[\]"):
        ReversibleSequence([])


@pytest.mark.parametrize("value", ["no", 0, None])
def test_reversible_must_be_a_bool(value):
    dense = keras.layers.Dense(4)
    with pytest.raises(ValueError, match=f"`reversible` must be True or False. "
                                         f"Received: reversible={value!r}"):
        ReversibleSequence([(dense, dense)], reversible=value)


def test_inputs_of_different_shapes():
    stack = ReversibleSequence([(keras.layers.Dense(FEATURES),
                                 keras.layers.Dense(FEATURES))])
    a = tf.zeros((2, 5, FEATURES))
    with pytest.raises(ValueError, match=r"x1.shape=\(2, 5, 8\), x2.shape=\(2, 6, 8\)"):
        stack([a, tf.zeros((2, 6, FEATURES))])
    with pytest.raises(ValueError, match=r"list \[x1, x2\]"):
        stack(a)
