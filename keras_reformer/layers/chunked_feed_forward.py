"""ChunkedFeedForward: the position-wise FFN computed slice by slice."""

import keras
from keras import activations
from keras import ops

from keras_reformer import _checks
from keras_reformer._dense_arguments import (
    dense_arguments_config,
    set_dense_arguments,
    sublayer_arguments,
)
# Reading weights in their own dtype (float32 under mixed precision) inside
# call() needs autocast switched off; Keras exposes no public scope for it.
from keras_reformer._compat import AutocastScope
from keras_reformer._seeds import SeedStatesInWeights, resolve_seed
from keras_reformer.ops import sequence_slices
from keras_reformer.ops.dropout import dropout


def _differentiated(variable):
    """Whether the slices' gradient is taken for `variable`."""
    return (
        variable.trainable
        and "float" in str(variable.dtype)
        # Not a gradient but a new value (float8 statistics): see
        # `ChunkedFeedForward._per_call_statistics`.
        and not getattr(variable, "overwrite_with_gradient", False)
    )


@keras.saving.register_keras_serializable(package="keras_reformer")
class ChunkedFeedForward(SeedStatesInWeights, keras.layers.Layer):
    """Position-wise feed-forward network, computed over slices of the sequence.

    Computes `Dense(intermediate_dim) -> activation -> dropout -> Dense(d)`
    at every position, where `d` is the input width (or `output_dim`). The
    sequence is cut into slices of `chunk_size` positions and the network is
    applied to one slice at a time, so the `intermediate_dim`-wide hidden
    tensor exists for one slice only. The gradient is computed slice by
    slice too, recomputing each slice's hidden tensor (Kitaev et al., 2020,
    section 4): training memory for the hidden layer is that of one slice, in graph
    mode and under XLA. The result equals the unchunked network's.

    Lengths that are not a multiple of `chunk_size` are padded inside the
    layer; the padding never leaks into outputs or gradients. With
    `chunk_size=None` the layer is the plain unchunked network (ordinary
    autodiff), e.g. for short sequences or comparisons.

    Every slice goes through the two `keras.layers.Dense` sublayers
    (`intermediate_dense`, `output_dense`) themselves, so what their `call`
    does applies slice by slice: after `quantize("int8")` or
    `quantize("int4")` (on the layer or on a model holding it) the slices
    compute with the quantized kernels and their scales, and with
    `enable_lora(rank)` on a sublayer, with its frozen kernel plus the LoRA
    update. The gradients summed over the slices are those of the trainable
    floating weights (biases, LoRA weights, unfrozen float kernels); frozen
    and integer kernels get none.

    After `quantize("float8")`, the Dense layers keep scaling statistics
    that their gradient overwrites (one new value per call). Those cannot
    be split into slices, so in training (`training=True`, also in
    `value_and_vjp`) the layer runs the plain unchunked network on the whole
    sequence, exactly as `Dense -> activation -> Dense` would. Out of
    training it computes slice by slice with the current statistics and
    leaves them unchanged (no gradient reaches them).

    Dropout masks come from the layer's `SeedGenerator`: one seed per call,
    one stateless mask per slice derived from it, so the backward pass (and a
    `ReversibleSequence` recomputation) sees the same masks as the forward.

    Args:
        intermediate_dim: int. Width of the hidden layer (`d_ff`).
        activation: activation of the hidden layer: a name or a callable,
            as in `keras.layers.Dense`. Defaults to `"gelu"`.
        dropout: float in [0, 1). Dropout rate on the hidden layer, in
            training. Defaults to `0.0`.
        chunk_size: int. Positions per slice, or `None` for no slicing.
            Defaults to `1024`: a slice's hidden activations are then
            `batch * 1024 * intermediate_dim` floats (4 MiB per sequence at
            width 1024), and a 16K training step of the reference model
            took 2.56 s against 3.20 s with 128 (fewer, larger matmuls and
            loop iterations; `benchmarks/profile_step.py [--ffn-chunk 128]`).
        output_dim: int. Width of the output. Defaults to `None`: the input
            width.
        use_bias: bool. Whether both dense layers have biases. Defaults to
            `True`.
        kernel_initializer: initializer of both kernels. Defaults to
            `"glorot_uniform"`. Each dense layer gets its own copy (with an
            int seed, the output layer's uses `seed + 1`), so the two
            kernels do not share values.
        bias_initializer: initializer of both biases. Defaults to `"zeros"`.
        kernel_regularizer, bias_regularizer, activity_regularizer,
        kernel_constraint, bias_constraint: as in `keras.layers.Dense`
            (applied to both dense layers). Default to `None`.
        seed: int in [0, 2**30) or `None`. Seed of the dropout masks; drawn
            now and stored in the config if `None`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: tensor of shape `(batch, length, features)`; `length` may
            be dynamic.
        training: Python bool. Whether to apply dropout.

    Returns:
        A tensor of shape `(batch, length, output_dim or features)`,
        carrying the input's Keras mask.

    Example:

    >>> import keras, keras_reformer as kr
    >>> ffn = kr.layers.ChunkedFeedForward(1024, chunk_size=128, dropout=0.1)
    >>> x = keras.random.normal((2, 1000, 64))
    >>> ffn(x, training=True).shape
    TensorShape([2, 1000, 64])
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        dropout=0.0,
        chunk_size=1024,
        output_dim=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.intermediate_dim = _checks.positive_int("intermediate_dim", intermediate_dim)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size, allow_none=True)
        self.output_dim = _checks.positive_int("output_dim", output_dim, allow_none=True)
        self.dropout = _checks.rate("dropout", dropout)
        self.activation = activations.get(activation)
        self.use_bias = _checks.boolean("use_bias", use_bias)
        set_dense_arguments(self, kernel_initializer, bias_initializer,
                            kernel_regularizer, bias_regularizer, kernel_constraint,
                            bias_constraint)
        self.seed = resolve_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def _dense(self, units, name, offset):
        # A fresh initializer per sublayer, or both would draw the same values.
        return keras.layers.Dense(
            units, use_bias=self.use_bias, name=name,
            **sublayer_arguments(self, offset),
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "ChunkedFeedForward expects inputs of shape (batch, length, "
                f"features) with known features. Received: {input_shape}"
            )
        self._input_dim = input_shape[-1]
        self.intermediate_dense = self._dense(
            self.intermediate_dim, "intermediate_dense", offset=0
        )
        self.intermediate_dense.build(input_shape)
        self.output_dense = self._dense(
            self.output_dim or input_shape[-1], "output_dense", offset=1
        )
        self.output_dense.build(input_shape[:-1] + (self.intermediate_dim,))
        self.built = True

    def _weights(self):
        """The two Dense layers' variables, each read once, as tensors.

        Returns `(trained, params, fixed)`: the trainable floating variables
        (their gradients are summed over the slices), their values `params`
        in the variable dtype, and `(variable, value)` pairs for every other
        variable (integer or frozen kernels, quantization scales, float8
        statistics). Read here, outside `ops.sequence_slices`'s custom gradient, so
        that no variable is read inside it; through `Variable.value`, so that
        a caller's `keras.StatelessScope` (a reversible stack's block
        weights) decides what they hold.
        """
        trained, params, fixed = [], [], []
        # Float32 weights under mixed precision: the slices' gradients are
        # summed into them, which float16 would do poorly.
        with AutocastScope(None):
            for dense in (self.intermediate_dense, self.output_dense):
                for variable in dense.variables:
                    # A tensor, never a variable, goes into the custom gradient.
                    value = ops.copy(variable.value)
                    if _differentiated(variable):
                        trained.append(variable)
                        params.append(value)
                    else:
                        fixed.append((variable, value))
        return trained, params, fixed

    def _per_call_statistics(self):
        """Whether a Dense's variables are overwritten with their gradient.

        Float8 quantization keeps scaling statistics that way: the gradient
        of one call is their new value, which a sum over slices is not.
        """
        return any(
            getattr(variable, "overwrite_with_gradient", False)
            for dense in (self.intermediate_dense, self.output_dense)
            for variable in dense.variables
        )

    def _unsliced(self, training):
        """Whether this call runs the plain network on the whole sequence."""
        return self.chunk_size is None or (
            bool(training) and self._per_call_statistics()
        )

    def _check_inputs(self, x):
        if len(x.shape) != 3 or x.shape[-1] != self._input_dim:
            raise ValueError(
                "ChunkedFeedForward expects inputs of shape (batch, length, "
                f"{self._input_dim}), the shape it was built for. Received: "
                f"shape={tuple(x.shape)}"
            )

    def _slice_fn(self, training, trained, fixed):
        """The network on one slice, `fn(xs, params, index)` for `ops.sequence_slices`.

        The slice goes through the Dense layers themselves, so whatever
        their `call` does (quantized kernels, LoRA) applies; a
        `keras.StatelessScope` makes them compute with `params` (the values
        of the `trained` variables) and the `fixed` values instead of
        reading their variables. Draws this call's dropout seed (one per
        call), so the forward pass and `value_and_vjp` each call it once, as
        `call` does.
        """
        rate = self.dropout if training else 0.0
        seed = self.seed_generator.next() if rate > 0 else None
        activation = self.activation
        intermediate, output = self.intermediate_dense, self.output_dense
        training = bool(training)

        def ffn(xs, params, index):
            # (B, C, D) -> (B, C, F) -> (B, C, D_out), in the compute dtype.
            # Each slice maps its own `params` (the backward's per-slice
            # copies), so the scope is made here, not once outside.
            mapping = list(zip(trained, params)) + fixed
            with keras.StatelessScope(
                state_mapping=mapping, initialize_variables=False
            ):
                h = activation(intermediate(xs, training=training))
                if rate > 0:
                    h = dropout(h, rate, sequence_slices.slice_seed(seed, index))
                return output(h, training=training)

        return ffn

    def _plain(self, x, training):
        rate = self.dropout if training else 0.0
        seed = self.seed_generator.next() if rate > 0 else None
        h = self.activation(self.intermediate_dense(x, training=training))
        if rate > 0:
            h = dropout(h, rate, sequence_slices.slice_seed(seed, 0))
        return self.output_dense(h, training=training)

    def call(self, inputs, training=None):
        x = inputs
        self._check_inputs(x)
        if self._unsliced(training):
            return self._plain(x, training)
        trained, params, fixed = self._weights()
        return sequence_slices.chunked_map(
            self._slice_fn(training, trained, fixed), x, params, self.chunk_size
        )

    def value_and_vjp(self, inputs, dy, training=None):
        """The output and its VJP with `dy`, slice by slice in one pass.

        What `ReversibleSequence`'s backward pass calls instead of rerunning
        the layer under a tape (see `ops.sequence_slices.chunked_value_and_vjp`): each
        slice's forward runs once, not twice. Run it under the caller's
        `tf.GradientTape` (and, to replay dropout, the `keras.StatelessScope`
        holding the forward's seed states), then finish the VJP there:
        `tape.gradient(targets, sources, output_gradients=target_grads)`,
        which carries the gradients from the inputs and from the weights (as
        read here) back to whatever the caller differentiates by.

        Args:
            inputs: as in `call`.
            dy: gradient of the output, of its shape.
            training: as in `call`.

        Returns:
            `(outputs, targets, target_grads)`: the output as `call` returns
            it, and two lists of tensors and their gradients.
        """
        if self._unsliced(training):
            # Nothing to fuse: ordinary autodiff through the caller's tape.
            outputs = self(inputs, training=training)
            return outputs, [outputs], [ops.cast(dy, outputs.dtype)]
        # What Keras' __call__ would do to the inputs (autocast).
        x = ops.cast(inputs, self.compute_dtype)
        self._check_inputs(x)
        trained, params, fixed = self._weights()
        fn = self._slice_fn(training, trained, fixed)
        outputs, dx, dparams = sequence_slices.chunked_value_and_vjp(
            fn, x, ops.cast(dy, self.compute_dtype), params, self.chunk_size
        )
        return outputs, [x] + params, [dx] + dparams

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        return input_shape[:-1] + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": activations.serialize(self.activation),
                "dropout": self.dropout,
                "chunk_size": self.chunk_size,
                "output_dim": self.output_dim,
                "use_bias": self.use_bias,
                **dense_arguments_config(self),
                "seed": self.seed,
            }
        )
        return config

