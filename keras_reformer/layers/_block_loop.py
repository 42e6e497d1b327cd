"""A reversible stack of identical blocks as one loop body over stacked weights.

Unrolled, every block is its own copy of the program: graph size, XLA
compile time and compile memory grow with depth, and XLA gives each copy its
own buffers (it hoists, e.g., the zero-filled outputs of LSHAttention's
grouped `map_fn` to the start of the program, one set per block). When the
blocks have the same structure, the stack instead runs the first block's
layers as a template inside a `tf.while_loop`, once forward and once
backward, feeding each iteration the weights of block i gathered from
stacked copies (the way JAX users scan over layers). The template reads
block i's weights through `keras.StatelessScope`, which also captures the
seed-generator updates of block i, so every block draws the random numbers
it would draw unrolled, and the backward pass replays them exactly.

With `stacked` variables (`ReversibleSequence(stack_weights=True)`) the
weights already are one variable per slot, of shape `(depth, ...)`: nothing
is stacked before the loop, and each slot's gradient is the loop's stacked
buffer itself, so the step (the optimizer's update included) has a kernel
per slot, not per block and slot, and XLA's program stops growing with depth.
"""

import keras
import tensorflow as tf

from keras_reformer.ops import recompute


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
    # which are looped over like the weights.
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
    """None if `blocks` can run as one loop body; else the reason, in words."""
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
    for position, name in ((0, "f"), (1, "g")):
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


def _variable_keys(variable):
    """The objects under which tf.custom_gradient may report `variable`."""
    keys = {id(variable)}
    inner = getattr(variable, "_value", None)
    if inner is not None:
        keys.add(id(inner))
    return keys


class BlockLoop:
    """Forward and recomputing backward of a reversible stack, as loops.

    Args:
        blocks: list of (f, g) layers with one structure (see
            `why_not_loopable`), built.
        run: `run(name, layer, x, kwargs)` -> the layer's output in the
            stream dtype (the sequence's own call wrapper).
        kwargs: (f_kwargs, g_kwargs) of the call, the same for every block.
        run_vjp: `run_vjp(name, layer, x, kwargs, dy)` -> (output, targets,
            target_grads), run under the backward's tape: the output and what
            to differentiate for the VJP with `dy` (the sequence's
            `_run_vjp`: one pass for blocks that offer `value_and_vjp`).
        stacked: optional {"f": [...], "g": [...]}: per half, one variable
            of shape `(depth, ...)` for each of the template's variables
            (in `template.variables` order), holding every block's value.
            Without it, each block's own variables are the weights.
    """

    def __init__(self, blocks, run, kwargs, run_vjp, stacked=None):
        self.blocks = blocks
        self.run = run
        self.run_vjp = run_vjp
        self.kwargs = kwargs
        self.depth = len(blocks)
        # Per half ("f", "g"): the template's variables and, slot by slot,
        # the same variable of every block.
        self.template = {"f": blocks[0][0], "g": blocks[0][1]}
        self.stacked_variables = stacked
        # Per half and slot: the template's variable (what kind of weight
        # the slot holds) and, in `slots`, the variables holding its values:
        # one per block, or the one stacked variable.
        self.kinds = {name: list(self.template[name].variables) for name in ("f", "g")}
        if stacked is None:
            self.slots = {
                name: [list(vs) for vs in zip(*(b[i].variables for b in blocks))]
                for i, name in ((0, "f"), (1, "g"))
            }
        else:
            self.slots = {name: [[v] for v in stacked[name]] for name in ("f", "g")}

    def _stacked(self):
        # Read once, before the loop: the values iteration i reads (and, for
        # the backward pass, the seed states of the forward). Plain tensors:
        # the backward pass captures them (a SavedModel cannot serialize a
        # gradient function that captures a TensorList), and each loop wraps
        # them in its own `_Stacked`.
        if self.stacked_variables is not None:
            return {
                name: [tf.convert_to_tensor(slot[0].value) for slot in slots]
                for name, slots in self.slots.items()
            }
        return {
            name: [[tf.convert_to_tensor(v.value) for v in slot] for slot in slots]
            for name, slots in self.slots.items()
        }

    def _call(self, name, values, x, dy=None):
        """Block i's half `name` (its variables' `values`) on `x`: its output,
        or with `dy` what `run_vjp` returns; and its variables' new values."""
        template = self.template[name]
        mapping = list(zip(template.variables, values))
        kwargs = self.kwargs[name == "g"]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            given = [scope.get_current_value(v) for v in template.variables]
            if dy is None:
                out = self.run(name, template, x, kwargs)
            else:
                out = self.run_vjp(name, template, x, kwargs, dy)
        # None where the call assigned nothing: frozen or quantized weights
        # (non-trainable, like seed states) are then not written back.
        updated = [
            None if scope.get_current_value(v) is before
            else tf.convert_to_tensor(scope.get_current_value(v))
            for v, before in zip(template.variables, given)
        ]
        return out, updated

    def forward(self):
        """The custom-gradient function: (x1, x2) -> ([y1, y2], grad_fn)."""
        loop = self

        @tf.custom_gradient
        def stack(x1, x2):
            with recompute.stop_recording():
                stacked = loop._stacked()
                y1, y2, states = loop._forward(stacked, x1, x2)
                loop._write_states(states)
            outputs = (y1, y2)

            def grad_fn(dy1, dy2, variables=None):
                return loop._backward(
                    loop._replayed(stacked), outputs, dy1, dy2, variables or []
                )

            return [y1, y2], grad_fn

        return stack

    @staticmethod
    def _replayed(stacked):
        """The values the backward pass reruns the blocks with: those the
        forward read, seed-generator states included, so each recomputation
        draws the forward's random numbers (tests replace this to show that
        reading the advanced states instead gives wrong gradients)."""
        return stacked

    def _forward(self, stacked, x1, x2):
        stacked = _wrap(stacked)
        # Trainable weights are not changed by a call; only the other
        # variables (seed generators, statistics) get block i's new values.
        changing = {
            name: [j for j, kind in enumerate(kinds) if not kind.trainable]
            for name, kinds in self.kinds.items()
        }
        arrays = {
            name: [_array_like(stacked[name][j], self.depth) for j in changing[name]]
            for name in ("f", "g")
        }

        # Which of them the blocks assign, found when the body is traced.
        written = {"f": set(), "g": set()}

        def keep(name, arrays, new, i):
            kept = []
            for array, j in zip(arrays, changing[name]):
                if new[j] is not None:
                    written[name].add(j)
                    array = array.write(i, new[j])
                kept.append(array)
            return kept

        def body(i, y1, y2, *flat):
            f_arrays, g_arrays = _unflat(flat, arrays)
            f_out, f_new = self._call("f", [s.read(i) for s in stacked["f"]], y2)
            y1 = y1 + f_out
            g_out, g_new = self._call("g", [s.read(i) for s in stacked["g"]], y1)
            y2 = y2 + g_out
            f_arrays = keep("f", f_arrays, f_new, i)
            g_arrays = keep("g", g_arrays, g_new, i)
            return (i + 1, y1, y2, *f_arrays, *g_arrays)

        out = tf.while_loop(
            lambda i, *_: i < self.depth, body,
            (tf.constant(0), x1, x2, *arrays["f"], *arrays["g"]),
            parallel_iterations=1,
        )
        f_arrays, g_arrays = _unflat(out[3:], arrays)
        states = {
            name: {j: a for j, a in zip(changing[name], new) if j in written[name]}
            for name, new in (("f", f_arrays), ("g", g_arrays))
        }
        return out[1], out[2], states

    def plain(self, x1, x2):
        """reversible=False over `stacked` variables (only with them): the
        template block by block with block i's slices, ordinary autodiff
        through the slices; non-trainable states (seed generators) advance
        as each block's own would."""
        values = self._stacked()
        updates = {"f": [], "g": []}
        y1, y2 = x1, x2
        for index in range(self.depth):
            out, new = self._call("f", [v[index] for v in values["f"]], y2)
            y1 = y1 + out
            updates["f"].append(new)
            out, new = self._call("g", [v[index] for v in values["g"]], y1)
            y2 = y2 + out
            updates["g"].append(new)
        for name, kinds in self.kinds.items():
            for j, kind in enumerate(kinds):
                news = [new[j] for new in updates[name]]
                if not kind.trainable and all(n is not None for n in news):
                    self.slots[name][j][0].assign(tf.stack(news))
        return y1, y2

    def _write_states(self, states):
        for name, slots in self.slots.items():
            for j, array in states[name].items():
                if self.stacked_variables is not None:
                    slots[j][0].assign(array.stack())
                    continue
                for index, variable in enumerate(slots[j]):
                    variable.assign(array.read(index))

    def _backward(self, stacked, outputs, dy1, dy2, variables):
        stacked = _wrap(stacked)
        y1 = tf.stop_gradient(outputs[0])
        y2 = tf.stop_gradient(outputs[1])
        dy1 = tf.zeros_like(y1) if dy1 is None else dy1
        dy2 = tf.zeros_like(y2) if dy2 is None else dy2
        trainable = {
            name: [j for j, kind in enumerate(kinds) if kind.trainable
                   and kind.dtype in ("float16", "bfloat16", "float32", "float64")]
            for name, kinds in self.kinds.items()
        }
        arrays = {
            name: [_array_like(stacked[name][j], self.depth) for j in trainable[name]]
            for name in ("f", "g")
        }

        def vjp(name, values, x, dy):
            weights = [values[j] for j in trainable[name]]
            with tf.GradientTape() as tape:
                tape.watch(x)
                tape.watch(weights)
                (out, targets, target_grads), _ = self._call(name, values, x, dy)
            grads = tape.gradient(targets, [x] + weights, output_gradients=target_grads)
            grads = [tf.zeros_like(t) if d is None else d
                     for t, d in zip([x] + weights, grads)]
            return tf.stop_gradient(out), grads[0], grads[1:]

        def body(k, y1, y2, dy1, dy2, *flat):
            f_arrays, g_arrays = _unflat(flat, arrays)
            i = self.depth - 1 - k
            # g: y2 = x2 + g(y1); recompute once dy2 exists (ordering, and
            # no merging with the forward loop under XLA).
            (y1,) = recompute.gradient_dependency([y1], [dy2])
            g_out, d_y1, g_grads = vjp("g", [s.read(i) for s in stacked["g"]], y1, dy2)
            dy1 = dy1 + d_y1
            x2 = y2 - g_out
            # f: y1 = x1 + f(x2).
            (x2,) = recompute.gradient_dependency([x2], [dy1])
            f_out, d_x2, f_grads = vjp("f", [s.read(i) for s in stacked["f"]], x2, dy1)
            dy2 = dy2 + d_x2
            x1 = y1 - f_out
            f_arrays = [a.write(i, g) for a, g in zip(f_arrays, f_grads)]
            g_arrays = [a.write(i, g) for a, g in zip(g_arrays, g_grads)]
            return (k + 1, x1, x2, dy1, dy2, *f_arrays, *g_arrays)

        out = tf.while_loop(
            lambda k, *_: k < self.depth, body,
            (tf.constant(0), y1, y2, dy1, dy2, *arrays["f"], *arrays["g"]),
            parallel_iterations=1,
        )
        f_arrays, g_arrays = _unflat(out[5:], arrays)
        by_variable = {}
        for name, grad_arrays in (("f", f_arrays), ("g", g_arrays)):
            for j, array in zip(trainable[name], grad_arrays):
                if self.stacked_variables is not None:
                    # The loop's buffer is the stacked variable's gradient.
                    for key in _variable_keys(self.slots[name][j][0]):
                        by_variable[key] = array.stack()
                    continue
                # Element by element: stack + unstack would copy twice.
                for index, variable in enumerate(self.slots[name][j]):
                    grad = array.read(index)
                    for key in _variable_keys(variable):
                        by_variable[key] = grad
        return [out[3], out[4]], [by_variable.get(id(v)) for v in variables]


def _wrap(values):
    return {name: [_Stacked(slot) for slot in slots] for name, slots in values.items()}


class _Stacked:
    """One weight slot of every block, for the loop to read block i's from.

    In graph mode a TensorArray holds each value as it is (no copy), where
    `tf.stack` plus a gather per iteration held two more copies of every
    weight; under XLA a stacked tensor (XLA's buffers did not shrink with
    the TensorArray and its compile grew).
    """

    def __init__(self, values):
        if not isinstance(values, (list, tuple)):  # already stacked
            self.dtype = values.dtype
            self.element_shape = values.shape[1:]
            self.array, self.stacked = None, values
            return
        self.dtype = values[0].dtype
        self.element_shape = values[0].shape
        if recompute.in_xla_context():
            self.array = None
            self.stacked = tf.stack(values)
        else:
            self.stacked = None
            # Read by the forward and again by the backward (eager arrays
            # would otherwise clear an element on its first read).
            array = tf.TensorArray(self.dtype, size=len(values),
                                   element_shape=self.element_shape,
                                   clear_after_read=False)
            for index, value in enumerate(values):
                array = array.write(index, value)
            self.array = array

    def read(self, index):
        if self.array is None:
            return tf.gather(self.stacked, index)
        return self.array.read(index)


def _array_like(array, size):
    return tf.TensorArray(array.dtype, size=size, element_shape=array.element_shape)


def _unflat(flat, arrays):
    count = len(arrays["f"])
    return list(flat[:count]), list(flat[count:])
