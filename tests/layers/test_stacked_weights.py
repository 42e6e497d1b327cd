"""ReversibleSequence(stack_weights=True, or "auto", the default, on blocks of
one structure): the stack holds (depth, ...) weights.

References are independent of the stacked path: a residual stack written
out here block by block with ordinary autodiff over each block's own
variables, the per-block model trained from the same initial
weights, a full pass for cached decoding, and XLA's own HLO for the
program size.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reformer.layers import ChunkedFeedForward, ReversibleSequence
from keras_reformer.models import ReformerBackbone, ReformerCausalLM
from tests.layers.blocks import AttentionBlock
from tests.layers.test_block_loop import FEATURES


def blocks_of(depth):
    keras.utils.set_random_seed(0)
    return [(AttentionBlock(seed=i), ChunkedFeedForward(16, chunk_size=4, dropout=0.1, seed=i))
            for i in range(depth)]


def built(stack):
    stack.build([(None, None, FEATURES)] * 2)
    return stack


def residual_reference(blocks, x, training):
    """y1 = x1 + f(x2), y2 = x2 + g(y1), block by block, plain autodiff."""
    y1 = y2 = x
    for f, g in blocks:
        y1 = y1 + f(y2, training=training)
        y2 = y2 + g(y1, training=training)
    return y1, y2


def loss_of(y1, y2):
    return tf.reduce_sum(y1 ** 2) + 1.5 * tf.reduce_sum(y2)


def slot_gradients(stack, grads):
    """The stacked gradients, by (half, slot)."""
    by_id = dict(zip([id(v) for v in stack.trainable_variables], grads))
    return {(name, j): by_id[id(v)] for name, slots in stack._stacked.items()
            for j, v in enumerate(slots) if v.trainable}


@pytest.mark.parametrize("mode, reversible", [
    ("eager", True), ("graph", True), ("xla", True), ("graph", False)])
def test_outputs_gradients_and_seed_states_match_per_block_autodiff(mode, reversible):
    depth = 2
    reference_blocks = blocks_of(depth)
    built(ReversibleSequence(reference_blocks, reversible=False,
                             stack_weights=False))  # builds them
    stack = built(ReversibleSequence(blocks_of(depth), reversible=reversible,
                                     stack_weights=True))
    x = tf.random.normal((2, 12, FEATURES), seed=1)
    weights = [v for f, g in reference_blocks for v in f.trainable_variables
               + g.trainable_variables]

    def reference():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_of(*residual_reference(reference_blocks, x, True))
        return loss, tape.gradient(loss, [x] + weights)

    def stacked():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_of(*stack([x, x], training=True))
        return loss, tape.gradient(loss, [x] + stack.trainable_variables)

    if mode != "eager":
        reference = tf.function(reference, jit_compile=mode == "xla")
        stacked = tf.function(stacked, jit_compile=mode == "xla")
    for _ in range(2):  # the second call draws from advanced seed states
        ref_loss, ref_grads = reference()
        loss, grads = stacked()
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-4, atol=1e-4)
        by_variable = dict(zip([id(v) for v in weights], ref_grads[1:]))
        for (name, j), grad in slot_gradients(stack, grads[1:]).items():
            position = 0 if name == "f" else 1
            expected = np.stack([
                by_variable[id(block[position].variables[j])]
                for block in reference_blocks
            ])
            scale = np.abs(expected).max() + 1.0
            np.testing.assert_allclose(grad, expected, atol=2e-5 * scale)
    # Seed-generator (and hash seed) states: block i's slice is where block
    # i's own state went.
    for name, position in (("f", 0), ("g", 1)):
        for j, variable in enumerate(stack._stacked[name]):
            if variable.trainable:
                continue
            expected = np.stack([block[position].variables[j].numpy()
                                 for block in reference_blocks])
            np.testing.assert_array_equal(variable.numpy(), expected)


def test_weights_are_the_stacked_variables_only():
    depth = 4
    stack = built(ReversibleSequence(blocks_of(depth), stack_weights=True))
    per_block = built(ReversibleSequence(blocks_of(depth), stack_weights=False))
    assert not per_block.stacked
    assert len(stack.variables) == len(per_block.variables) // depth
    assert all(v.shape[0] == depth for v in stack.variables)
    assert stack.count_params() == per_block.count_params()
    assert len(stack.weights) == len(per_block.weights) // depth
    # Initialized from the blocks' own values, in layer.variables order.
    f0 = per_block.blocks[2][0].variables
    for j, variable in enumerate(stack._stacked["f"]):
        np.testing.assert_array_equal(variable.numpy()[2], f0[j].numpy())


def test_block_scope_reads_block_i_of_the_stack():
    stack = built(ReversibleSequence(blocks_of(3), stack_weights=True))
    for variable in stack.trainable_variables:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape) * 0.3)
    x = tf.random.normal((1, 8, FEATURES), seed=2)
    # Reference: a fresh block given block 1's slice as its own weights.
    keras.utils.set_random_seed(0)
    fresh = ChunkedFeedForward(16, chunk_size=4, dropout=0.1, seed=1)
    fresh.build((None, None, FEATURES))
    for variable, slot in zip(fresh.variables, stack._stacked["g"]):
        variable.assign(slot.numpy()[1])
    g1 = stack.blocks[1][1]
    with stack.block_scope(1):
        scoped = g1(x)
    np.testing.assert_allclose(scoped, fresh(x), rtol=1e-5, atol=1e-6)
    # Outside the scope the block's own (untrained) variables differ.
    assert np.abs(g1(x).numpy() - scoped.numpy()).max() > 1e-3
    with pytest.raises(ValueError, match=r"`index` must be in \[0, 3\). Received: index=3"):
        stack.block_scope(3)


def test_inverse_rebuilds_inputs():
    stack = built(ReversibleSequence(blocks_of(3), stack_weights=True))
    for variable in stack.trainable_variables:
        variable.assign(np.random.default_rng(1).normal(size=variable.shape) * 0.2)
    x1 = tf.random.normal((2, 16, FEATURES), seed=3)
    x2 = tf.random.normal((2, 16, FEATURES), seed=4)
    back = stack.inverse(stack([x1, x2]))
    np.testing.assert_allclose(back[0], x1, atol=1e-4)
    np.testing.assert_allclose(back[1], x2, atol=1e-4)


def test_arguments():
    with pytest.raises(ValueError, match="cannot be combined with loop_blocks=False"):
        ReversibleSequence(blocks_of(2), loop_blocks=False, stack_weights=True)
    different = [(AttentionBlock(), ChunkedFeedForward(16, chunk_size=4)),
                 (AttentionBlock(), ChunkedFeedForward(32, chunk_size=4))]
    with pytest.raises(ValueError, match=r"`stack_weights=True` needs blocks of one "
                                         r"structure, but block 1's `g`"):
        ReversibleSequence(different, stack_weights=True)
    with pytest.raises(ValueError, match=r"`stack_weights` must be one of 'auto', True "
                                         r"or False. Received: stack_weights='yes'"):
        ReversibleSequence(blocks_of(2), stack_weights="yes")
    stack = ReversibleSequence(blocks_of(2), stack_weights=True)
    config = stack.get_config()
    assert config["stack_weights"] is True
    again = ReversibleSequence.from_config(config)
    assert again.stack_weights is True


def test_auto_stacks_the_blocks_that_loop():
    # The default: stacked weights exactly when the blocks run as one loop.
    assert ReversibleSequence(blocks_of(2)).stack_weights == "auto"
    assert built(ReversibleSequence(blocks_of(2))).stacked
    assert built(ReversibleSequence(blocks_of(2), reversible=False)).stacked
    assert not built(ReversibleSequence(blocks_of(1))).stacked
    assert not built(ReversibleSequence(blocks_of(2), loop_blocks=False)).stacked
    assert not built(ReversibleSequence(blocks_of(2), stack_weights=False)).stacked
    different = [(AttentionBlock(), ChunkedFeedForward(16, chunk_size=4)),
                 (AttentionBlock(), ChunkedFeedForward(32, chunk_size=4))]
    assert not built(ReversibleSequence(different)).stacked
    shared = ChunkedFeedForward(16, chunk_size=4)
    assert not built(ReversibleSequence([(AttentionBlock(), shared),
                                         (AttentionBlock(), shared)])).stacked
    # The choice is remade from the config; a config saved before "auto"
    # (no key) keeps each block's weights, as it did.
    config = ReversibleSequence(blocks_of(2)).get_config()
    assert config["stack_weights"] == "auto"
    assert built(ReversibleSequence.from_config(config)).stacked
    del config["stack_weights"]
    old = built(ReversibleSequence.from_config(config))
    assert old.stack_weights is False and not old.stacked


TINY = dict(vocabulary_size=40, num_layers=3, hidden_dim=16, num_heads=2,
            intermediate_dim=32, feedforward_chunk_size=8, bucket_size=8,
            max_sequence_length=64, seed=3, dropout=0.1)


def backbone_of(stack_weights, **extra):
    keras.utils.set_random_seed(7)
    return ReformerBackbone(stack_weights=stack_weights, **{**TINY, **extra})


def model_of(stack_weights, **extra):
    """The language model (logits) on `backbone_of`."""
    return ReformerCausalLM(backbone_of(stack_weights, **extra))


@pytest.mark.slow  # two models fitted (~25 s); one training step is compared with per-block autodiff above
def test_fit_matches_per_block_model():
    """Same initial weights, same batches: same losses and trained weights
    (under XLA, the path stacking is for; graph mode is checked above)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 40, size=(8, 16)).astype(np.int32)
    data = ({"token_ids": ids, "padding_mask": np.ones_like(ids)}, np.roll(ids, -1, 1))
    histories, models = [], []
    for stack_weights in (False, True):
        model = model_of(stack_weights, num_layers=2)
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
        histories.append(model.fit(*data, batch_size=4, epochs=2, shuffle=False,
                                   verbose=0).history["loss"])
        models.append(model)
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4)
    assert histories[0][-1] < histories[0][0]  # it trained
    per_block, stacked = (m.backbone.reversible_stack for m in models)
    for (name, j), variable in {
        (name, j): v for name, slots in stacked._stacked.items()
        for j, v in enumerate(slots)
    }.items():
        position = 0 if name == "f" else 1
        expected = np.stack([b[position].variables[j].numpy() for b in per_block.blocks])
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-3, atol=1e-5)


def test_cached_decoding_uses_the_stacked_weights():
    lm = model_of(True, dropout=0.0)
    stack = lm.backbone.reversible_stack
    # Move the stacked weights away from the blocks' own (initial) values,
    # so decoding with the blocks' variables would be visibly wrong.
    rng = np.random.default_rng(4)
    for variable in stack.trainable_variables:
        variable.assign(variable.numpy() + rng.normal(size=variable.shape) * 0.2)
    ids = np.random.default_rng(5).integers(1, 40, size=(2, 40)).astype(np.int32)
    full = lm.predict({"token_ids": ids, "padding_mask": np.ones_like(ids)}, verbose=0)
    decoder = lm._decoder()
    logits, _, caches = decoder.prompt_pass(tf.constant(ids[:, :10]),
                                            tf.ones((2, 10), tf.bool), 40)
    errors = [np.abs(logits.numpy() - full[:, 9]).max()]
    step = tf.function(decoder.step)  # one trace for the 30 steps
    for position in range(10, 40):
        logits, _, caches = step(tf.constant(ids[:, position]),
                                 tf.fill([2], position), caches)
        errors.append(np.abs(logits.numpy() - full[:, position]).max())
    assert max(errors) < 1e-4


def test_save_and_reload(tmp_path):
    model = model_of(True)
    stack = model.backbone.reversible_stack
    for variable in stack.trainable_variables:
        variable.assign(np.random.default_rng(6).normal(size=variable.shape) * 0.1)
    ids = np.random.default_rng(7).integers(1, 40, size=(2, 24)).astype(np.int32)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    expected = model.predict(inputs, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert again.backbone.reversible_stack.stack_weights
    np.testing.assert_allclose(again.predict(inputs, verbose=0), expected, atol=1e-5)
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = model_of(True)
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(fresh.predict(inputs, verbose=0), expected, atol=1e-5)
    # set_num_hashes still reaches the blocks' attention layers.
    again.backbone.set_num_hashes(4)
    assert all(b[0].attention.num_hashes == 4
               for b in again.backbone.reversible_stack.blocks)


def hlo_instructions(model, ids):
    """Instructions of XLA's HLO for one Adam training step of `model`."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    inputs = {"token_ids": tf.constant(ids), "padding_mask": tf.ones_like(ids)}

    @tf.function(jit_compile=True)
    def step(inputs):
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                inputs["token_ids"], logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    hlo = step.experimental_get_compiler_ir(inputs)(stage="hlo")
    return len(re.findall(r"^\s+\S+ = ", hlo, flags=re.M))


def test_xla_program_does_not_grow_with_depth():
    ids = np.ones((1, 16), np.int32)
    sizes = {
        (stack_weights, depth): hlo_instructions(
            model_of(stack_weights, num_layers=depth, dropout=0.0), ids)
        for stack_weights in (False, True) for depth in (2, 4)
    }
    print(sizes)
    per_block = sizes[False, 4] - sizes[False, 2]
    # Per-block weights add gradient slices and optimizer updates per block;
    # stacked, two more blocks change nothing but constants.
    assert per_block > 50
    assert abs(sizes[True, 4] - sizes[True, 2]) <= 2


@pytest.mark.parametrize("source, target", [(True, False), (False, True)])
def test_weights_load_across_layouts(tmp_path, source, target):
    # Both layouts save through the blocks (the stack stores nothing of its
    # own), so a weights file of one loads into the other.
    saved = model_of(source)
    stack = saved.backbone.reversible_stack
    for variable in stack.trainable_variables:
        variable.assign(np.random.default_rng(8).normal(size=variable.shape) * 0.1)
    path = str(tmp_path / "lm.weights.h5")
    saved.save_weights(path)
    loaded = model_of(target)
    loaded.load_weights(path)
    ids = np.random.default_rng(9).integers(1, 40, size=(2, 24)).astype(np.int32)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(np.asarray(loaded(inputs)), np.asarray(saved(inputs)),
                               atol=1e-5)


@pytest.mark.usefixtures("no_gc_on_variable_delete")
def test_quantize_through_the_stack_uses_the_trained_values():
    # `stack.quantize` first writes the stacked (trained) values into the
    # blocks: its output is that of the per-block stack quantized the same way.
    stacks = [built(ReversibleSequence(blocks_of(3), stack_weights=s)) for s in (True, False)]
    rng = np.random.default_rng(10)
    for variable in stacks[0].trainable_variables:  # away from the blocks' own values
        variable.assign(variable.numpy() + rng.normal(size=variable.shape) * 0.3)
    for index, ((f, g), (f0, g0)) in enumerate(zip(stacks[1].blocks, stacks[0].blocks)):
        with stacks[0].block_scope(index):
            values = [np.asarray(v.value) for v in f0.variables + g0.variables]
        for v, value in zip(f.variables + g.variables, values):
            v.assign(value)
    x = tf.constant(np.random.default_rng(11).normal(size=(2, 12, FEATURES)), tf.float32)
    before = [np.asarray(y) for y in stacks[1]([x, x])]
    for stack in stacks:
        stack.quantize("int8")
    outs = [[np.asarray(y) for y in stack([x, x])] for stack in stacks]
    for a, b, c in zip(outs[0], outs[1], before):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.abs(a - c).max() > 0  # quantized: not the float outputs
    assert any(v.dtype == "int8" for v in stacks[0].weights)


@pytest.mark.usefixtures("no_gc_on_variable_delete")
def test_quantizing_the_blocks_behind_the_stack():
    # `keras.Model.quantize` of a model holding the stack quantizes the
    # blocks' layers from the blocks' own values: right while they hold the
    # stack's (untrained, synced), a clear error once the stack trained.
    x = tf.constant(np.random.default_rng(12).normal(size=(1, 8, FEATURES)), tf.float32)
    stacks = [built(ReversibleSequence(blocks_of(2), stack_weights=s)) for s in (True, False)]
    for stack in stacks:
        keras.Model.quantize(keras.Sequential([g for _, g in stack.blocks]), "int8")
    outs = [[np.asarray(y) for y in stack([x, x])] for stack in stacks]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(v.dtype == "int8" for v in stacks[0].weights)

    # After a load (the blocks hold the loaded values; the stack takes them
    # before its next use), every slot comes from the blocks, also those
    # that quantizing leaves in place (biases, norms).
    stacks = [built(ReversibleSequence(blocks_of(2), stack_weights=s)) for s in (True, False)]
    rng = np.random.default_rng(13)
    for pair, pair0 in zip(*(stack.blocks for stack in stacks)):
        for v, w in zip([v for layer in pair for v in layer.variables],
                        [v for layer in pair0 for v in layer.variables]):
            if v.dtype == "float32":
                value = v.numpy() + rng.normal(size=v.shape) * 0.1
                v.assign(value)
                w.assign(value)
    stacks[0].load_own_variables({})  # a load: the blocks were filled
    for stack in stacks:
        keras.Model.quantize(keras.Sequential([g for _, g in stack.blocks]), "int8")
    outs = [[np.asarray(y) for y in stack([x, x])] for stack in stacks]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-6)

    stack = built(ReversibleSequence(blocks_of(2), stack_weights=True))
    kernel = next(v for v in stack._stacked["g"] if v.path.endswith("kernel"))
    kernel.assign(kernel.numpy() + 0.1)  # trained: the blocks' values are stale
    model_of_layers = keras.Sequential([stack.blocks[0][1], stack.blocks[1][1]])
    keras.Model.quantize(model_of_layers, "int8")  # the blocks' own (stale) values
    with pytest.raises(ValueError, match=r"Call `sync_blocks\(\)` on the stack.*"
                                         r"ReversibleSequence.quantize"):
        stack([x, x])
