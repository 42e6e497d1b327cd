"""The reversible residual rule of `ReversibleSequence`, written once.

A reversible block is a pair of layers `(f, g)`; on `(x1, x2)` it computes

    y1 = x1 + f(x2)
    y2 = x2 + g(y1)

and its inputs can be rebuilt from its outputs (`x2 = y2 - g(y1)`,
`x1 = y1 - f(x2)`). `forward_block`, `inverse_block` and `backward_block`
are that rule for block `i`, in half-steps; they reach the block's layers
only through a runner, which knows where block `i`'s weights and random
seeds are:

* `PerBlockRunner`: every block runs its own layers on its own variables;
  the seed-generator states of each half are copied before it runs, and
  its recomputation replays them.
* `TemplateRunner`: the blocks have one structure (`why_not_loopable`);
  block 0's layers run as a template on block `i`'s values, read before
  the forward pass from every block's variables (or from the stacked
  weights, one variable of shape `(depth, ...)` per slot). Those values,
  seed-generator states included, are what the backward pass replays.

`forward` (ordinary autodiff), `reversible` (a `tf.custom_gradient` that
keeps only the stack's outputs and recomputes backward) and `inverse` drive
the blocks. With a `TemplateRunner`, `reversible` runs the blocks as the
body of a `tf.while_loop`, forward and backward, so that the program (graph
size, XLA compile time and memory, XLA's buffers) does not grow with depth;
otherwise the drivers are a Python loop over the same half-steps, one copy
of the program per block.
"""

import keras
import tensorflow as tf

from keras_reformer.layers import _fused_vjp
from keras_reformer.ops import recompute

HALVES = (("f", 0), ("g", 1))


def describe(value):
    """`repr(value)`, cut to 120 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def same_shape(a, b):
    """Whether two shapes agree where both are known."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def check_block_output(index, name, layer, shape, out):
    """Raises a ValueError unless `out` has the block input's `shape`."""
    out_shape = getattr(out, "shape", None)
    if out_shape is None or not same_shape(out_shape, shape):
        raise ValueError(
            f"Block {index} ({name}={layer.name!r}) must return a tensor "
            f"of the shape of its input. Input shape: {tuple(shape)}, "
            f"output: {describe(out_shape if out_shape is not None else out)}"
        )


# ------------------------------------------------------- block structure


def _structure(layer):
    """(class, config without names and seeds, variable shapes/dtypes, each
    sublayer's compute dtype and quantization mode)."""
    try:
        config = _strip(layer.get_config())
    except NotImplementedError:
        return None
    variables = [
        (tuple(v.shape), str(v.dtype), bool(v.trainable)) for v in layer.variables
    ]
    policies = [
        (type(sub).__name__, sub.compute_dtype, sub.quantization_mode)
        for sub in layer._flatten_layers(include_self=True)
    ]
    return type(layer), repr(config), variables, policies


def _strip(config):
    # Names differ between blocks by construction; seeds only reach the
    # computation through variables (seed-generator states, `hash_seed`),
    # which the template reads per block like the weights.
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicyMap":
            # A map of every layer path (quantized models): it names each
            # block's own layers, and Keras fills it as layers are made.
            # The policies it gives are compared layer by layer instead.
            return "DTypePolicyMap"
        # Keras numbers shared objects (a dtype policy all blocks share) while
        # it loads: the first config of such an object has no id, later ones do.
        return {k: _strip(v) for k, v in config.items()
                if k not in ("name", "seed", "shared_object_id")}
    if isinstance(config, (list, tuple)):
        return [_strip(v) for v in config]
    return config


def why_not_loopable(blocks, min_blocks=2):
    """None if `blocks` can run as one template (`TemplateRunner`); else the
    reason, in words."""
    if len(blocks) < min_blocks:
        return "there is only one block"
    seen = set()
    for f, g in blocks:
        for layer in (f, g):
            for sub in layer._flatten_layers(include_self=True, recursive=True):
                if id(sub) in seen:
                    return f"layer {sub.name!r} appears in more than one block"
                seen.add(id(sub))
                if getattr(sub, "activity_regularizer", None) is not None:
                    return f"layer {sub.name!r} has an activity regularizer"
    for name, position in HALVES:
        first = _structure(blocks[0][position])
        if first is None:
            return f"block 0's `{name}` has no get_config()"
        for index, block in enumerate(blocks[1:], start=1):
            if _structure(block[position]) != first:
                return (
                    f"block {index}'s `{name}` ({block[position].name!r}) differs "
                    f"from block 0's in class, configuration or weights"
                )
    return None


# ------------------------------------------------------------ the rule


def forward_block(runner, i, y1, y2, carry):
    """Block `i` on `(y1, y2)`: `y1 + f(y2)`, then `y2 + g(y1)`."""
    out, carry = runner.forward("f", i, y2, carry)
    y1 = y1 + out
    out, carry = runner.forward("g", i, y1, carry)
    y2 = y2 + out
    return y1, y2, carry


def inverse_block(runner, i, y1, y2, carry):
    """Block `i`'s inputs from its outputs: `y2 - g(y1)`, then `y1 - f(x2)`."""
    out, carry = runner.forward("g", i, y1, carry)
    x2 = y2 - out
    out, carry = runner.forward("f", i, x2, carry)
    x1 = y1 - out
    return x1, x2, carry


def backward_block(runner, i, y1, y2, dy1, dy2, carry, done=None):
    """Block `i`'s backward: rebuilds its inputs and takes its VJPs.

    Given the outputs `(y1, y2)` and their gradients, returns the inputs
    `(x1, x2)`, their gradients, the runner's carry (which holds the weight
    gradients) and the weight gradients of `f`.

    Each half is recomputed only once the gradient it will be multiplied by
    exists (`gradient_dependency`: the executor's order, and no merging
    with the forward pass under XLA). `done`, in a Python loop over the
    blocks, holds the weight gradients of the half-block run before: the
    next recomputation also waits for them (so that what they read is freed
    first), and under XLA the block boundaries are fusion barriers
    (`recompute.barrier`). In a while loop body (`done=None`) the
    iterations are already ordered by their data.
    """
    unrolled = done is not None
    fence = recompute.barrier if unrolled else list
    waits = list(done) if unrolled else []
    # g: y2 = x2 + g(y1).
    y1, y2, dy1, dy2, *_ = fence([y1, y2, dy1, dy2] + waits)
    (y1,) = recompute.gradient_dependency([y1], [dy2] + waits)
    g_out, d_y1, grads, carry = runner.vjp("g", i, y1, dy2, carry)
    dy1 = dy1 + d_y1 if d_y1 is not None else dy1
    x2 = y2 - g_out
    # f: y1 = x1 + f(x2), once the total dy1 exists.
    waits = list(grads) if unrolled else []
    x2, dy1, dy2, *_ = fence([x2, dy1, dy2] + waits)
    (x2,) = recompute.gradient_dependency([x2], [dy1] + waits)
    f_out, d_x2, grads, carry = runner.vjp("f", i, x2, dy1, carry)
    dy2 = dy2 + d_x2 if d_x2 is not None else dy2
    x1 = y1 - f_out
    return x1, x2, dy1, dy2, carry, grads


# ------------------------------------------------------------- drivers


def _over_blocks(step, depth, state, loop, reverse=False):
    """`state = step(i, *state)` for every block `i`, from the last one
    with `reverse`: as a `tf.while_loop` with `loop` (the program holds one
    block), else as a Python loop (one copy of the program per block)."""
    if not loop:
        for i in (reversed(range(depth)) if reverse else range(depth)):
            state = step(i, *state)
        return tuple(state)

    def body(k, *state):
        i = depth - 1 - k if reverse else k
        return (k + 1, *step(i, *state))

    out = tf.while_loop(
        lambda k, *_: k < depth, body, (tf.constant(0), *state),
        parallel_iterations=1,
    )
    return tuple(out[1:])


def forward(runner, x1, x2):
    """The stack on `(x1, x2)`, block by block, under ordinary autodiff."""
    carry = runner.start_forward(record_seeds=False)
    y1, y2, carry = _over_blocks(
        lambda i, y1, y2, carry: forward_block(runner, i, y1, y2, carry),
        runner.depth, (x1, x2, carry), loop=False,
    )
    runner.finish_forward(carry)
    return y1, y2


def inverse(runner, y1, y2):
    """The stack's inputs rebuilt from its outputs; variables are not
    changed (a call that changes them is not inverted by this)."""
    carry = runner.start_forward(record_seeds=False)
    x1, x2, _ = _over_blocks(
        lambda i, y1, y2, carry: inverse_block(runner, i, y1, y2, carry),
        runner.depth, (y1, y2, carry), loop=False, reverse=True,
    )
    return x1, x2


def reversible(runner, x1, x2):
    """The stack on `(x1, x2)`, with a backward pass that recomputes.

    Only the outputs are kept: the gradient walks back block by block,
    rebuilding each block's inputs and taking its VJPs with the forward's
    random numbers. Both passes are while loops for a `TemplateRunner`
    (`runner.loops`).
    """

    @tf.custom_gradient
    def stack(x1, x2):
        with recompute.stop_recording():
            carry = runner.start_forward(record_seeds=True)
            y1, y2, carry = _over_blocks(
                lambda i, y1, y2, carry: forward_block(runner, i, y1, y2, carry),
                runner.depth, (x1, x2, carry), loop=runner.loops,
            )
            replay = runner.finish_forward(carry)
        outputs = (y1, y2)

        def grad_fn(dy1, dy2, variables=None):
            return _backward(runner, replay, outputs, dy1, dy2,
                             list(variables or []))

        return [y1, y2], grad_fn

    y1, y2 = stack(x1, x2)
    return y1, y2


def _backward(runner, replay, outputs, dy1, dy2, variables):
    y1 = tf.stop_gradient(outputs[0])
    y2 = tf.stop_gradient(outputs[1])
    dy1 = tf.zeros_like(y1) if dy1 is None else dy1
    dy2 = tf.zeros_like(y2) if dy2 is None else dy2
    # Gradients are returned for the list TF hands us (its order differs
    # between eager and graph mode).
    carry = runner.start_backward(replay, variables)
    if runner.loops:
        def step(i, y1, y2, dy1, dy2, carry):
            return backward_block(runner, i, y1, y2, dy1, dy2, carry)[:5]

        state = (y1, y2, dy1, dy2, carry)
    else:
        def step(i, y1, y2, dy1, dy2, carry, done):
            return backward_block(runner, i, y1, y2, dy1, dy2, carry, done)

        state = (y1, y2, dy1, dy2, carry, [])
    _, _, dy1, dy2, carry, *_ = _over_blocks(
        step, runner.depth, state, loop=runner.loops, reverse=True)
    return [dy1, dy2], runner.finish_backward(carry, variables)


# ------------------------------------------------------------- runners


class BlockRunner:
    """Runs the halves of a stack's blocks for the drivers above.

    A runner is made per call. Its `carry` is what the drivers thread
    through the blocks for it (in a while loop: loop variables).

    * `start_forward(record_seeds)` -> carry (`record_seeds`: whether a
      backward pass will replay this forward's random numbers);
      `forward(half, i, x, carry)` -> (half `half` of block `i` on `x`,
      carry);
      `finish_forward(carry)` writes the variables the blocks changed and
      returns what the backward pass replays.
    * `start_backward(replay, variables)` -> carry; `vjp(half, i,
      x, dy, carry)` -> (output, gradient for `x` or None, weight gradients,
      carry); `finish_backward(carry, variables)` -> the gradient of each of
      `variables` (or None).

    Args:
        blocks: list of built `(f, g)` layers.
        kwargs: per block, `{"f": ..., "g": ...}` call arguments.
        stream_dtype: the dtype of the residual streams.
    """

    loops = False

    def __init__(self, blocks, kwargs, stream_dtype):
        self.blocks = blocks
        self.kwargs = kwargs
        self.stream_dtype = stream_dtype
        self.depth = len(blocks)

    def _layer(self, half, index):
        return self.blocks[index][0 if half == "f" else 1]

    def _call_layer(self, index, half, layer, x, kwargs):
        """`layer(x)` in the stream dtype, its shape checked."""
        out = layer(x, **kwargs)
        if not same_shape(out.shape, x.shape):
            check_block_output(index, half, layer, x.shape, out)
        return tf.cast(out, self.stream_dtype)

    def _call_layer_vjp(self, index, half, layer, x, kwargs, dy):
        """Under the caller's tape: `layer`'s output (stream dtype) and the
        `(targets, target_grads)` whose gradient is its VJP with `dy`.

        A block offering `value_and_vjp` (see `_fused_vjp`) gives its
        output and gradients in one pass; any other is just run, its output
        being the target.
        """
        fused = _fused_vjp.method_of(layer)
        if fused is None:
            out = self._call_layer(index, half, layer, x, kwargs)
            return out, [out], [dy]
        out, targets, target_grads = fused(x, dy, **kwargs)
        if not same_shape(out.shape, x.shape):
            check_block_output(index, half, layer, x.shape, out)
        return tf.cast(out, self.stream_dtype), targets, target_grads


class PerBlockRunner(BlockRunner):
    """Each block's own layers on their own variables (any blocks).

    The forward pass calls the layers; before each half, with
    `record_seeds`, it copies the states of the half's seed generators,
    and the backward pass reruns the half inside `keras.StatelessScope`
    with those values, taking gradients against the variables TF hands to
    the custom gradient (summed over the blocks that share a layer).
    """

    def start_forward(self, record_seeds):
        if not record_seeds:
            return None
        self._seed_states = [
            {half: recompute.seed_state_variables(self._layer(half, i))
             for half, _ in HALVES}
            for i in range(self.depth)
        ]
        return {}

    def forward(self, half, i, x, carry):
        if carry is not None:
            carry[(half, i)] = recompute.snapshot(self._seed_states[i][half])
        layer = self._layer(half, i)
        return self._call_layer(i, half, layer, x, self.kwargs[i][half]), carry

    def finish_forward(self, carry):
        return carry

    @staticmethod
    def _replayed(snapshots):
        """The seed states each half is rerun with: those copied before it
        ran (tests replace this to show that rerunning on the advanced
        states gives wrong gradients)."""
        return snapshots

    def start_backward(self, replay, variables):
        self._replay = self._replayed(replay)
        self._sources = [
            v for v in variables
            if v.dtype.is_floating and getattr(v, "trainable", True)
        ]
        return {}  # id(variable) -> its gradient summed so far

    def vjp(self, half, i, x, dy, totals):
        layer = self._layer(half, i)
        sources = self._sources
        mapping = list(zip(self._seed_states[i][half], self._replay[(half, i)]))
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(sources)
            with keras.StatelessScope(state_mapping=mapping):
                out, targets, target_grads = self._call_layer_vjp(
                    i, half, layer, x, self.kwargs[i][half], dy)
        grads = tape.gradient(targets, [x] + sources, output_gradients=target_grads)
        present = []
        for variable, grad in zip(sources, grads[1:]):
            if grad is None:
                continue
            present.append(grad)
            key = id(variable)
            totals[key] = grad if key not in totals else totals[key] + grad
        return tf.stop_gradient(out), grads[0], present, totals

    def finish_backward(self, totals, variables):
        return [totals.get(id(v)) for v in variables]


class TemplateRunner(BlockRunner):
    """Blocks of one structure, as block 0's layers run on block i's values.

    The template reads block `i`'s values through `keras.StatelessScope`,
    which also captures the seed-generator updates of block `i`, so every
    block draws the random numbers it would draw on its own layers, and the
    backward pass, rerunning on the values the forward read, replays them.

    Args:
        stacked_weights: optional `{"f": [...], "g": [...]}`: per half, one
            variable of shape `(depth, ...)` for each of the template's
            variables (in `template.variables` order), holding every block's
            value (`ReversibleSequence(stack_weights=True)`). Nothing is then
            stacked before the loop, and each slot's gradient is the loop's
            buffer itself, so a training step (the optimizer's update
            included) has a kernel per slot, not per block and slot, and
            XLA's program stops growing with depth. Without it, each
            block's own variables are the weights.
    """

    loops = True

    def __init__(self, blocks, kwargs, stream_dtype, stacked_weights=None):
        super().__init__(blocks, kwargs, stream_dtype)
        self.template = {half: blocks[0][position] for half, position in HALVES}
        self.stacked_weights = stacked_weights
        # Per half and slot: the template's variable (what kind of weight
        # the slot holds) and, in `slots`, the variables holding its values:
        # one per block, or the one stacked variable.
        self.kinds = {half: list(layer.variables) for half, layer in self.template.items()}
        if stacked_weights is None:
            self.slots = {
                half: [list(vs) for vs in zip(*(b[position].variables for b in blocks))]
                for half, position in HALVES
            }
        else:
            self.slots = {half: [[v] for v in stacked_weights[half]]
                          for half, _ in HALVES}
        # Trainable weights are not changed by a call; only the other
        # variables (seed generators, statistics) get block i's new values.
        self._changing = {
            half: [j for j, kind in enumerate(kinds) if not kind.trainable]
            for half, kinds in self.kinds.items()
        }
        self._trainable = {
            half: [j for j, kind in enumerate(kinds) if kind.trainable
                   and kind.dtype in ("float16", "bfloat16", "float32", "float64")]
            for half, kinds in self.kinds.items()
        }
        # Which changing slots the blocks assign, found when they are traced.
        self._written = {half: set() for half, _ in HALVES}

    def read(self):
        # Before the first block: the values block i reads (and, for the
        # backward pass, the seed states of the forward). Plain tensors: the
        # backward pass captures them (a SavedModel cannot serialize a
        # gradient function that captures a TensorList), and each pass
        # wraps them in its own `_PerBlockValues`.
        if self.stacked_weights is not None:
            return {
                half: [tf.convert_to_tensor(slot[0].value) for slot in slots]
                for half, slots in self.slots.items()
            }
        return {
            half: [[tf.convert_to_tensor(v.value) for v in slot] for slot in slots]
            for half, slots in self.slots.items()
        }

    def _values(self, half, i):
        return [values.read(i) for values in self._per_block[half]]

    def _call(self, half, values, x, dy=None):
        """The template's half `half` on its variables' `values` and `x`: its
        output, or with `dy` what `_call_layer_vjp` returns; and its
        variables' new values."""
        template = self.template[half]
        mapping = list(zip(template.variables, values))
        kwargs = self.kwargs[0][half]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            given = [scope.get_current_value(v) for v in template.variables]
            if dy is None:
                out = self._call_layer(0, half, template, x, kwargs)
            else:
                out = self._call_layer_vjp(0, half, template, x, kwargs, dy)
        # None where the call assigned nothing: frozen or quantized weights
        # (non-trainable, like seed states) are then not written back.
        updated = [
            None if scope.get_current_value(v) is before
            else tf.convert_to_tensor(scope.get_current_value(v))
            for v, before in zip(template.variables, given)
        ]
        return out, updated

    def start_forward(self, record_seeds):
        self._recorded = self.read()
        self._per_block = _per_block_values(self._recorded)
        return {
            half: [_array_like(self._per_block[half][j], self.depth)
                   for j in self._changing[half]]
            for half, _ in HALVES
        }

    def forward(self, half, i, x, carry):
        out, new = self._call(half, self._values(half, i), x)
        arrays = []
        for array, j in zip(carry[half], self._changing[half]):
            if new[j] is not None:
                self._written[half].add(j)
                array = array.write(i, new[j])
            arrays.append(array)
        return out, {**carry, half: arrays}

    def finish_forward(self, carry):
        for half, slots in self.slots.items():
            for j, array in zip(self._changing[half], carry[half]):
                if j not in self._written[half]:
                    continue
                if self.stacked_weights is not None:
                    slots[j][0].assign(array.stack())
                    continue
                for index, variable in enumerate(slots[j]):
                    variable.assign(array.read(index))
        return self._recorded

    @staticmethod
    def _replayed(recorded):
        """The values the backward pass reruns the blocks with: those the
        forward read, seed-generator states included, so each recomputation
        draws the forward's random numbers (tests replace this to show that
        reading the advanced states instead gives wrong gradients)."""
        return recorded

    def start_backward(self, replay, variables):
        self._per_block = _per_block_values(self._replayed(replay))
        return {
            half: [_array_like(self._per_block[half][j], self.depth)
                   for j in self._trainable[half]]
            for half, _ in HALVES
        }

    def vjp(self, half, i, x, dy, carry):
        values = self._values(half, i)
        weights = [values[j] for j in self._trainable[half]]
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(weights)
            (out, targets, target_grads), _ = self._call(half, values, x, dy)
        grads = tape.gradient(targets, [x] + weights, output_gradients=target_grads)
        grads = [tf.zeros_like(t) if d is None else d
                 for t, d in zip([x] + weights, grads)]
        arrays = [a.write(i, g) for a, g in zip(carry[half], grads[1:])]
        return tf.stop_gradient(out), grads[0], grads[1:], {**carry, half: arrays}

    def finish_backward(self, carry, variables):
        by_variable = {}
        for half, grad_arrays in carry.items():
            for j, array in zip(self._trainable[half], grad_arrays):
                if self.stacked_weights is not None:
                    # The loop's buffer is the stacked variable's gradient.
                    for key in _variable_keys(self.slots[half][j][0]):
                        by_variable[key] = array.stack()
                    continue
                # Element by element: stack + unstack would copy twice.
                for index, variable in enumerate(self.slots[half][j]):
                    grad = array.read(index)
                    for key in _variable_keys(variable):
                        by_variable[key] = grad
        return [by_variable.get(id(v)) for v in variables]


def _variable_keys(variable):
    """The objects under which tf.custom_gradient may report `variable`."""
    keys = {id(variable)}
    inner = getattr(variable, "_value", None)
    if inner is not None:
        keys.add(id(inner))
    return keys


def _per_block_values(recorded):
    return {half: [_PerBlockValues(slot) for slot in slots]
            for half, slots in recorded.items()}


class _PerBlockValues:
    """One weight slot's value for every block, for block i's to be read.

    From the blocks' own variables, in graph mode a TensorArray holds each
    value as it is (no copy), where `tf.stack` plus a gather per iteration
    held two more copies of every weight; under XLA one tensor of shape
    `(depth, ...)` (XLA's buffers did not shrink with the TensorArray and
    its compile grew). The stacked weights' value is used as it is.
    """

    def __init__(self, values):
        if not isinstance(values, (list, tuple)):  # a stacked weight's value
            self.dtype = values.dtype
            self.element_shape = values.shape[1:]
            self.array, self.tensor = None, values
            return
        self.dtype = values[0].dtype
        self.element_shape = values[0].shape
        if recompute.in_xla_context():
            self.array = None
            self.tensor = tf.stack(values)
        else:
            self.tensor = None
            # Read by the forward and again by the backward (eager arrays
            # would otherwise clear an element on its first read).
            array = tf.TensorArray(self.dtype, size=len(values),
                                   element_shape=self.element_shape,
                                   clear_after_read=False)
            for index, value in enumerate(values):
                array = array.write(index, value)
            self.array = array

    def read(self, index):
        if self.array is not None:
            return self.array.read(index)
        if isinstance(index, int):
            # A Python loop (`forward` on stacked weights) differentiates
            # through this: a slice's gradient is dense, a gather's sparse.
            return self.tensor[index]
        return tf.gather(self.tensor, index)


def _array_like(values, size):
    return tf.TensorArray(values.dtype, size=size, element_shape=values.element_shape)
