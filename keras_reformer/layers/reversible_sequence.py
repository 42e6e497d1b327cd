"""ReversibleSequence: a stack of reversible (F, G) blocks that recomputes backward."""

import contextlib

import keras
import tensorflow as tf

from keras_reformer import _checks
from keras_reformer.layers import _reversible_engine as engine
from keras_reformer.ops import recompute


def _check_blocks(blocks):
    if isinstance(blocks, keras.layers.Layer) or not isinstance(
        blocks, (list, tuple)
    ):
        raise ValueError(
            "`blocks` must be a list of (f, g) pairs of Keras layers. "
            f"Received: blocks={engine.describe(blocks)}"
        )
    if not blocks:
        raise ValueError(
            f"`blocks` must hold at least one (f, g) pair. Received: blocks={blocks!r}"
        )
    if len(blocks) == 2 and all(isinstance(b, keras.layers.Layer) for b in blocks):
        raise ValueError(
            "`blocks` must be a list of (f, g) pairs; it looks like a single "
            "pair. Wrap it in a list: blocks=[(f, g)]. "
            f"Received: blocks={engine.describe(blocks)}"
        )
    pairs = []
    for index, block in enumerate(blocks):
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise ValueError(
                f"Block {index} must be a pair (f, g) of Keras layers. "
                f"Received: blocks[{index}]={engine.describe(block)}"
            )
        for name, layer in zip(("f", "g"), block):
            if not isinstance(layer, keras.layers.Layer):
                raise ValueError(
                    f"Block {index}: `{name}` must be a Keras layer. "
                    f"Received: blocks[{index}].{name}={engine.describe(layer)}"
                )
        pairs.append((block[0], block[1]))
    return pairs


def _slot_name(half, j, kind, layer):
    """`f.attention.qk.kernel`: the half and the variable's path inside the
    block (variable names may not hold "/"); `f_3_kernel` without a path."""
    path = getattr(kind, "path", None) or ""
    prefix = (getattr(layer, "path", None) or layer.name) + "/"
    if prefix in path:
        return f"{half}." + path.split(prefix, 1)[1].replace("/", ".")
    return f"{half}_{j}_{kind.name}"


def _holds(variables, slot):
    """Whether the stacked `slot` holds the values of `variables`, stacked."""
    with tf.init_scope():
        values = [tf.convert_to_tensor(v.value) for v in variables]
        return bool(tf.reduce_all(tf.equal(
            tf.convert_to_tensor(slot.value), tf.stack(values))))


class _SlotBook:
    """What the stacked slots were made from: per slot, the blocks'
    variables it stacks. A plain object, out of Keras' variable tracking
    (which would count the blocks' variables as the stack's own), holding
    the variables themselves so that their ids cannot be reused while
    compared."""

    def __init__(self, sources, block_variables):
        self.sources = sources  # [(block variables, slot variable)]
        self.block_variables = block_variables


@keras.saving.register_keras_serializable(package="keras_reformer")
class ReversibleSequence(keras.layers.Layer):
    """A stack of reversible residual blocks whose backward pass recomputes.

    Each block is a pair `(f, g)` of Keras layers that map a tensor to one of
    the same shape. Called on `[x1, x2]`, block by block:

        y1 = x1 + f(x2)
        y2 = x2 + g(y1)

    and the layer returns the last block's `[y1, y2]`. Because a block's
    inputs can be rebuilt from its outputs (`x2 = y2 - g(y1)`,
    `x1 = y1 - f(x2)`), the gradient (a `tf.custom_gradient` over the whole
    stack) keeps only the stack's outputs: walking back block by block it
    rebuilds each block's inputs, reruns the block under a gradient tape and
    takes that block's input and weight gradients. Activation memory is that
    of one block, whatever the depth (in graph mode: `model.fit`,
    `tf.function`, `jit_compile=True`; eager execution keeps more). A block
    that offers `value_and_vjp(inputs, dy, ...)` (`FeedForwardBlock`,
    `ChunkedFeedForward`) gives its output and gradients in one pass
    instead, so its FFN slices are not computed twice in the backward.

    Randomness is replayed: before each `f` and `g` runs, the states of all
    `keras.random.SeedGenerator`s inside it (those of `keras.layers.Dropout`,
    `LSHAttention`, `ChunkedFeedForward`, or any layer of yours) are copied,
    and the recomputation runs inside `keras.StatelessScope` with those
    values, so it draws the same dropout masks and hash rotations as the
    forward pass. Random ops seeded by Keras' global generator (`seed=None`)
    are not replayed: give such layers their own `SeedGenerator`.

    A Keras padding mask on the inputs (e.g. from
    `Embedding(mask_zero=True)`) is passed to every block whose `call` takes
    `mask` (or, failing that, `query_mask`), and `training` to every
    block whose `call` takes it. The output keeps the input mask.

    Under mixed precision the two residual streams are kept in the variable
    dtype (float32) inside the stack, so that rebuilding the inputs by
    subtraction stays accurate; the blocks compute in their own dtype and
    the outputs are cast to the layer's compute dtype.

    Activity regularizers of layers inside the blocks add their losses in
    the forward pass, but those losses are not differentiated through the
    blocks when `reversible=True` (the forward pass is not recorded).

    Args:
        blocks: list of `(f, g)` pairs of Keras layers, each layer mapping
            `(batch, ..., features)` to a tensor of the same shape. A layer
            may appear in several blocks (its weights are shared).
        reversible: bool. If `False`, compute the same function with
            ordinary autodiff (every activation kept), for tests and
            debugging. Defaults to `True`.
        loop_blocks: `"auto"`, `True` or `False`. With `True`, the blocks
            (which must all have the same structure: class, configuration
            up to names and seeds, and weight shapes) run as one loop body
            over every block's weights, forward and backward, so the program
            (graph size, XLA compile time and memory, XLA's buffers) does
            not grow with depth. `"auto"` (default) loops when
            `reversible=True`, there are at least two blocks and they have
            one structure, and unrolls otherwise; `False` always unrolls.
            The result is the same either way.
        stack_weights: `"auto"`, `True` or `False`. If `True`, the stack
            holds its weights itself, one variable of shape
            `(num_blocks, ...)` per weight of a block (initialized from the
            blocks' own values at build time), the way JAX users scan over
            stacked layers. The blocks must have one structure; they run as
            one loop body (`loop_blocks` must not be `False`). Gradients and
            optimizer updates are then one tensor per kind of weight
            instead of one per block, so under XLA the compiled step (and
            its compile memory) no longer grows with depth
            (docs/benchmarks.md, "Stacked weights"). The blocks' own
            variables are not trained and are not among the stack's
            `weights`/`variables`: to run block `i` on its trained weights
            outside the stack, do so under `stack.block_scope(i)` (or write
            them into the blocks with `sync_blocks()`). The blocks' layers
            stay the slots' templates: after `quantize` or `enable_lora`
            (see `quantize`) the slots follow their variables. Weights are
            saved through the blocks, so files of either layout load into
            the other. `"auto"` (default) stacks blocks that can loop
            (`loop_blocks` not `False`, at least two blocks of one
            structure, see `loop_blocks`; also with `reversible=False`, so
            that both settings have one weight layout) and keeps each
            block's own weights otherwise; `stacked` says which it chose once the
            layer is built. `False`: each block keeps its own weights (the
            earlier default: a saved config without this key loads as
            `False`).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: list `[x1, x2]` of two tensors of the same shape
            `(batch, ..., features)`; `[x, x]` for a Reformer stack.
        mask: optional boolean padding mask of shape `(batch, length)` (or
            a list of two, one per input), passed to the blocks. Set
            automatically from a Keras mask on the inputs.
        training: Python bool, passed to the blocks. Defaults to `False`
            outside `fit` (no dropout, fixed LSH rotations).

    Returns:
        List `[y1, y2]` of two tensors of the inputs' shape, in the layer's
        compute dtype, carrying the input mask.

    Example:

    >>> import keras, keras_reformer as kr
    >>> def ffn():
    ...     return keras.Sequential([
    ...         keras.layers.LayerNormalization(),
    ...         kr.layers.ChunkedFeedForward(64, chunk_size=16),
    ...     ])
    >>> blocks = [(ffn(), ffn()) for _ in range(4)]
    >>> stack = kr.layers.ReversibleSequence(blocks)
    >>> x = keras.random.normal((2, 50, 16))
    >>> y1, y2 = stack([x, x])
    >>> y1.shape
    TensorShape([2, 50, 16])
    """

    def __init__(self, blocks, reversible=True, loop_blocks="auto",
                 stack_weights="auto", **kwargs):
        super().__init__(**kwargs)
        pairs = _check_blocks(blocks)
        # Two flat lists, so that Keras tracks every layer (and each weight
        # once, also when a layer is shared between blocks).
        self.f_layers = [f for f, _ in pairs]
        self.g_layers = [g for _, g in pairs]
        self.reversible = _checks.boolean("reversible", reversible)
        self.loop_blocks = _checks.auto_or_boolean("loop_blocks", loop_blocks)
        self.stack_weights = _checks.auto_or_boolean("stack_weights", stack_weights)
        if self.stack_weights is True and self.loop_blocks is False:
            raise ValueError(
                "`stack_weights=True` runs the blocks as one loop body over the "
                "stacked weights; it cannot be combined with loop_blocks=False. "
                "Received: stack_weights=True, loop_blocks=False"
            )
        if self.stack_weights is True:
            reason = engine.why_not_loopable(pairs, min_blocks=1)
            if reason is not None:
                raise ValueError(
                    "`stack_weights=True` needs blocks of one structure, but "
                    f"{reason}. Use stack_weights=False."
                )
        # {"f": [...], "g": [...]}: the stacked variables, made in build().
        self._stacked = None
        self._book = None
        self._needs_block_values = False
        self.supports_masking = True

    @property
    def blocks(self):
        return list(zip(self.f_layers, self.g_layers))

    @property
    def _stream_dtype(self):
        return self.variable_dtype

    # ----------------------------------------------------------------- build

    def _input_shapes(self, input_shape):
        if (
            not isinstance(input_shape, (list, tuple))
            or len(input_shape) != 2
            or not all(isinstance(s, (list, tuple)) for s in input_shape)
        ):
            raise ValueError(
                "ReversibleSequence must be called on a list [x1, x2] of two "
                f"tensors of the same shape. Received input shape: {input_shape}"
            )
        shape1, shape2 = (tuple(s) for s in input_shape)
        if not engine.same_shape(shape1, shape2):
            raise ValueError(
                "ReversibleSequence expects [x1, x2] of the same shape. "
                f"Received: x1.shape={shape1}, x2.shape={shape2}"
            )
        if len(shape1) < 2 or shape1[-1] is None:
            raise ValueError(
                "ReversibleSequence expects inputs of shape (batch, ..., "
                f"features) with known features. Received: x1.shape={shape1}"
            )
        return shape1, shape2

    def build(self, input_shape):
        shape, _ = self._input_shapes(input_shape)
        # A symbolic call builds each block the way the functional API would
        # (also blocks without a build() of their own) and gives its output
        # shape to check.
        spec = keras.KerasTensor(shape, dtype=self._stream_dtype)
        # Blocks without an output shape of their own are traced in a
        # scratch graph, whose custom gradients would otherwise stay
        # registered (and the graph alive) for good. One block at a time, so
        # that each trace can be freed before the next one is made.
        for index, (f, g) in enumerate(self.blocks):
            for name, layer in (("f", f), ("g", g)):
                with recompute.throwaway_trace():
                    out = layer(spec)
                engine.check_block_output(index, name, layer, shape, out)
        if self._stacks_weights():
            self._stack_from_blocks()
        self.built = True

    def _stacks_weights(self):
        """Whether the built stack holds its weights stacked (see
        `stack_weights`; "auto": whenever the blocks can loop)."""
        if self.stack_weights != "auto":
            return self.stack_weights
        return self.loop_blocks is not False and engine.why_not_loopable(self.blocks) is None

    @property
    def stacked(self):
        """Whether this stack holds its weights as `(num_blocks, ...)`
        variables (`stack_weights=True`, or `"auto"` on blocks of one
        structure); False before it is built."""
        return self._stacked is not None

    # ------------------------------------------------------ stacked weights
    #
    # With stacked weights the stack's variables are the trained ones
    # and the blocks' own variables are templates: they give each slot its
    # shape, dtype, trainability and meaning. Three things keep the two in
    # step. (1) A change of the blocks' variables (`enable_lora`, which adds
    # variables; `quantize`, which replaces them) is noticed by comparing
    # the blocks' variables with those the slots were made from, and the
    # slots are made again; a slot whose block variables still exist keeps
    # its (trained) values. (2) `sync_blocks()` writes the stacked values
    # into the blocks, for work that must read them there (quantizing
    # computes int8 kernels from the blocks' float kernels). (3) Saving goes
    # through the blocks, whose own save logic knows what a quantized or
    # LoRA layer stores: `save_own_variables` syncs the blocks and stores
    # nothing itself; a load fills the blocks, and the stack takes their
    # values before it is next used.

    def _block_variables(self):
        return [
            [layer.variables for layer in (f, g)] for f, g in self.blocks
        ]

    def _blocks_changed(self):
        now = self._block_variables()
        then = self._book.block_variables
        return len(now) != len(then) or any(
            len(a) != len(b) or any(x is not y for x, y in zip(a, b))
            for block_now, block_then in zip(now, then)
            for a, b in zip(block_now, block_then)
        )

    def _stack_from_blocks(self, keep_values=True):
        """(Re)makes the stacked variables from the blocks' variables.

        A slot whose block variables are those it was made from keeps its
        variable and values when `keep_values`; every other slot gets a new
        variable holding the blocks' current values.
        """
        reason = engine.why_not_loopable(self.blocks, min_blocks=1)
        if reason is not None:
            raise ValueError(
                "Stacked weights need blocks of one structure, but "
                f"{reason} (after a change of the blocks' layers?)."
            )
        book = getattr(self, "_book", None)
        previous = book.sources if (book is not None and keep_values) else []
        stacked, sources = {}, []
        self._stacked_weight_ids = set()
        for position, name in ((0, "f"), (1, "g")):
            layers = [block[position] for block in self.blocks]
            slots = []
            for j, kind in enumerate(layers[0].variables):
                values = tuple(layer.variables[j] for layer in layers)
                slot = next(
                    (slot for made_from, slot in previous
                     if all(a is b for a, b in zip(made_from, values))),
                    None,
                )
                if slot is None:
                    slot = self._new_slot(name, j, kind, values)
                sources.append((values, slot))
                slots.append(slot)
                # Keras counts seed-generator states as variables, not weights.
                if any(kind is w for w in layers[0].weights):
                    self._stacked_weight_ids.add(id(slot))
            stacked[name] = slots
        kept = {id(slot) for _, slot in sources}
        for _, slot in (book.sources if book is not None else []):
            if id(slot) not in kept:
                self._untrack_variable(slot)
        self._stacked = stacked
        self._book = _SlotBook(sources, self._block_variables())
        self._needs_block_values = False
        self._sync_trainable()

    def _new_slot(self, name, j, kind, values):
        def initializer(shape, dtype, values=values):
            # Eagerly (this may run inside a trace), from the blocks' values.
            with tf.init_scope():
                return tf.stack([tf.convert_to_tensor(v.value) for v in values])

        locked = self._tracker.locked
        self._tracker.unlock()  # the stack may be made again after its build
        try:
            with tf.init_scope():
                slot = self.add_weight(
                    name=_slot_name(name, j, kind, self.blocks[0][0 if name == "f" else 1]),
                    shape=(len(values),) + tuple(kind.shape),
                    dtype=kind.dtype, trainable=kind.trainable,
                    initializer=initializer, autocast=False,
                )
        finally:
            if locked:
                self._tracker.lock()
        return slot

    def _sync_trainable(self):
        # A slot is trained exactly when its block variables are (a frozen
        # layer, LoRA's frozen kernels), whatever `self.trainable` says:
        # keras-hub's `enable_lora` freezes every layer, this one included,
        # before it unfreezes the LoRA weights inside the blocks.
        for name, slots in self._stacked.items():
            kinds = self.blocks[0][0 if name == "f" else 1].variables
            for kind, slot in zip(kinds, slots):
                slot.trainable = bool(kind.trainable)

    def _current_stacked(self):
        """The stacked variables, made again first if the blocks changed."""
        if self._stacked is None:
            return None
        if self._blocks_changed():
            current = {id(v) for block in self._block_variables()
                       for variables in block for v in variables}
            # A replaced variable (quantize) was read by whatever replaced
            # it: right if the blocks held the stack's values (nothing
            # trained since the stack was built, loaded or synced).
            stale = [
                slot.path for made_from, slot in self._book.sources
                if not all(id(v) in current for v in made_from)
                and not self._needs_block_values
                and not _holds(made_from, slot)
            ]
            if stale:
                raise ValueError(
                    f"The blocks' layers of ReversibleSequence {self.name!r} "
                    "(whose weights are stacked) replaced variables that the "
                    f"stack holds ({', '.join(stale[:3])}), reading the blocks' "
                    "values, which are not the stack's trained ones (e.g. "
                    "`quantize` called on the layers themselves, or through "
                    "`keras.Model.quantize`). Call `sync_blocks()` on the stack "
                    "before changing its blocks' layers, or quantize through "
                    "`ReversibleSequence.quantize`, `ReformerBackbone.quantize` "
                    "or `ReformerCausalLM.quantize`."
                )
            # After a load (see above) the blocks hold the values: every
            # slot is made from them.
            self._stack_from_blocks(keep_values=not self._needs_block_values)
        elif self._needs_block_values:
            # Loaded through the blocks (see above): take their values.
            with tf.init_scope():
                for name, slots in self._stacked.items():
                    position = 0 if name == "f" else 1
                    for j, slot in enumerate(slots):
                        slot.assign(tf.stack([
                            tf.convert_to_tensor(block[position].variables[j].value)
                            for block in self.blocks
                        ]))
            self._needs_block_values = False
        self._sync_trainable()
        return self._stacked

    def sync_blocks(self):
        """Writes the stacked weights into the blocks' own variables.

        With `stack_weights=True` the blocks' variables are otherwise not
        updated by training. After this call, block `i`'s layers hold block
        `i`'s trained values (until the next training step), e.g. to
        inspect or reuse a block on its own. Without stacked weights this
        does nothing.
        """
        stacked = self._current_stacked()
        if stacked is None:
            return
        with tf.init_scope():
            for name, slots in stacked.items():
                position = 0 if name == "f" else 1
                for j, slot in enumerate(slots):
                    value = tf.convert_to_tensor(slot.value)
                    for index, block in enumerate(self.blocks):
                        block[position].variables[j].assign(value[index])

    def quantize(self, mode=None, type_check=True, config=None, filters=None):
        """Quantizes the blocks' layers (what `keras.Model.quantize` does to
        a model's layers), also with stacked weights.

        With `stack_weights=True`, the blocks first take the stacked (trained)
        values, their layers are quantized, and the stack is made again from
        the quantized variables (e.g. int8 kernels and their scales, stacked).
        `keras.Model.quantize` on a model holding this layer calls the
        layers inside the blocks directly, past this method: use it on
        `ReformerBackbone`/`ReformerCausalLM` (which route through here) or
        call this method. Arguments as in `keras.Model.quantize`.
        """
        from keras.src.quantizers.utils import should_quantize_layer

        self.sync_blocks()
        for f, g in self.blocks:
            for layer in (f, g):
                for sub in layer._flatten_layers(include_self=True):
                    if len(list(sub._flatten_layers())) != 1:
                        continue
                    if filters is not None and not should_quantize_layer(sub, filters):
                        continue
                    try:
                        sub.quantize(mode, type_check=type_check, config=config)
                    except (NotImplementedError, AttributeError):
                        continue
        self.restack()

    def restack(self):
        """Makes the stacked variables again from the blocks' own values.

        For a change of the blocks' layers made after `sync_blocks()`
        (`quantize` and `enable_lora` of the Reformer models do both).
        Without stacked weights this does nothing.
        """
        if self._stacked is not None:
            self._stack_from_blocks(keep_values=False)

    def save_own_variables(self, store):
        if self._stacked is None:
            return super().save_own_variables(store)
        # The blocks save the values (see "stacked weights" above).
        self.sync_blocks()

    def load_own_variables(self, store):
        if self._stacked is None:
            return super().load_own_variables(store)
        if len(store.keys()):
            raise ValueError(
                f"Layer {self.name!r} (stacked weights) keeps its weights "
                "in its blocks' entries of a weights file, but the file has "
                f"{len(store.keys())} entries of its own: it was written by "
                "another layout of the stack."
            )
        self._needs_block_values = True

    # Once stacked, the stack's weights are its own variables only: the
    # blocks' (unused) ones would otherwise be trained on no gradient and
    # saved twice over.

    @property
    def variables(self):
        if self._stacked is None:
            return super().variables
        self._current_stacked()
        return list(self._trainable_variables + self._non_trainable_variables)

    @property
    def weights(self):
        if self._stacked is None:
            return super().weights
        return [v for v in self.variables if id(v) in self._stacked_weight_ids]

    @property
    def trainable_variables(self):
        if self._stacked is None:
            return super().trainable_variables
        return [v for v in self.variables if v.trainable]

    @property
    def trainable_weights(self):
        if self._stacked is None:
            return super().trainable_weights
        return [v for v in self.weights if v.trainable]

    @property
    def non_trainable_variables(self):
        if self._stacked is None:
            return super().non_trainable_variables
        return [v for v in self.variables if not v.trainable]

    @property
    def non_trainable_weights(self):
        if self._stacked is None:
            return super().non_trainable_weights
        return [v for v in self.weights if not v.trainable]

    def block_scope(self, index):
        """Context in which block `index`'s layers read their stacked weights.

        With `stack_weights=True`, the blocks' own variables are not the
        trained ones; inside this scope (a `keras.StatelessScope`) block
        `index`'s `f` and `g` compute with the stack's values for block
        `index`. Variable updates inside it are not kept. Without stacked
        weights this does nothing.
        """
        stacked = self._current_stacked()
        if stacked is None:
            return contextlib.nullcontext()
        if not 0 <= index < len(self.f_layers):
            raise ValueError(
                f"`index` must be in [0, {len(self.f_layers)}). Received: index={index}"
            )
        mapping = []
        for position, name in ((0, "f"), (1, "g")):
            layer = self.blocks[index][position]
            for variable, slot in zip(layer.variables, stacked[name]):
                mapping.append((variable, tf.convert_to_tensor(slot.value)[index]))
        return keras.StatelessScope(state_mapping=mapping)

    # ------------------------------------------------------------------ call

    def _block_kwargs(self, layer, mask, training):
        kwargs = {}
        params = layer._call_signature.parameters
        if "training" in params:
            kwargs["training"] = training
        if mask is not None:
            # A (batch, length) padding mask is a query/key mask: passed as
            # `attention_mask` it would read as MultiHeadAttention's (T, S).
            if "mask" in params:
                kwargs["mask"] = mask
            elif "query_mask" in params:
                kwargs["query_mask"] = mask
        return kwargs

    def call(self, inputs, mask=None, training=None):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                "ReversibleSequence must be called on a list [x1, x2] of two "
                f"tensors. Received: {engine.describe(inputs)}"
            )
        x1, x2 = inputs
        self._input_shapes([tuple(x1.shape), tuple(x2.shape)])
        if isinstance(mask, (list, tuple)):
            mask = next((m for m in mask if m is not None), None)
        training = False if training is None else training
        x1 = tf.cast(x1, self._stream_dtype)
        x2 = tf.cast(x2, self._stream_dtype)
        stacked = self._current_stacked()
        template = stacked is not None or (self.reversible and self._loops())
        runner = self._runner(mask, training, template, stacked)
        if self.reversible:
            y1, y2 = engine.reversible(runner, x1, x2)
        else:
            y1, y2 = engine.forward(runner, x1, x2)
        return [tf.cast(y1, self.compute_dtype), tf.cast(y2, self.compute_dtype)]

    def _runner(self, mask, training, template, stacked):
        """The runner of this call's blocks: block 0's layers as a template
        on every block's (or the stacked) weights, or each block's own."""
        kwargs = [
            {half: self._block_kwargs(layer, mask, training)
             for half, layer in (("f", f), ("g", g))}
            for f, g in self.blocks
        ]
        if template:
            return engine.TemplateRunner(
                self.blocks, kwargs, self._stream_dtype, stacked_weights=stacked)
        return engine.PerBlockRunner(self.blocks, kwargs, self._stream_dtype)

    def _loops(self):
        """Whether this call runs the blocks as one loop (see `loop_blocks`)."""
        if self.loop_blocks is False:
            return False
        reason = engine.why_not_loopable(self.blocks)
        if reason is not None and self.loop_blocks is True:
            raise ValueError(
                "ReversibleSequence(loop_blocks=True) needs blocks of one "
                f"structure, but {reason}. Use loop_blocks='auto' or False."
            )
        return reason is None

    def inverse(self, outputs, mask=None):
        """Rebuilds the inputs `[x1, x2]` from the outputs `[y1, y2]`.

        Runs the blocks in inference mode (`training=False`: no dropout,
        fixed LSH rotations), so it inverts an inference-mode call. The
        backward pass does the same walk with the forward's random seeds.
        """
        y1, y2 = (tf.cast(y, self._stream_dtype) for y in outputs)
        stacked = self._current_stacked()
        runner = self._runner(mask, False, stacked is not None, stacked)
        x1, x2 = engine.inverse(runner, y1, y2)
        return [tf.cast(x1, self.compute_dtype), tf.cast(x2, self.compute_dtype)]

    # ------------------------------------------------------------ keras API

    def compute_output_shape(self, input_shape):
        shape1, shape2 = self._input_shapes(input_shape)
        return [shape1, shape2]

    def compute_output_spec(self, inputs, mask=None, training=None):
        shape1, shape2 = self._input_shapes([tuple(x.shape) for x in inputs])
        return [
            keras.KerasTensor(shape1, dtype=self.compute_dtype),
            keras.KerasTensor(shape2, dtype=self.compute_dtype),
        ]

    def compute_mask(self, inputs, mask=None):
        if mask is None:
            return None
        if isinstance(mask, (list, tuple)):
            known = next((m for m in mask if m is not None), None)
            return None if known is None else [known, known]
        return [mask, mask]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "blocks": [
                    [
                        keras.saving.serialize_keras_object(f),
                        keras.saving.serialize_keras_object(g),
                    ]
                    for f, g in self.blocks
                ],
                "reversible": self.reversible,
                "loop_blocks": self.loop_blocks,
                "stack_weights": self.stack_weights,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Saved before "auto" was the default: each block kept its weights.
        config.setdefault("stack_weights", False)
        blocks = [
            (
                keras.saving.deserialize_keras_object(f),
                keras.saving.deserialize_keras_object(g),
            )
            for f, g in config.pop("blocks")
        ]
        return cls(blocks=blocks, **config)
