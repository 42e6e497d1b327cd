"""TensorFlow plumbing of recomputing backward passes (reversible stack, chunked FFN).

What every recomputing gradient here needs, kept in one place:

* `stop_recording()`: run a forward pass without the outer gradient tape
  recording it. In graph mode the custom gradient already hides the ops from
  autodiff; in eager mode this is what keeps the tape from holding every
  intermediate (the same thing `tf.recompute_grad` does).
* `gradient_dependency(tensors, grad)`: an exact `+ 0` that XLA cannot fold,
  computed from the incoming gradient. XLA ignores control dependencies and
  merges a recomputation with the identical forward computation (common
  subexpression elimination), which silently undoes the memory saving; the
  TensorFlow executor, for its part, may run every recomputation before any
  gradient unless something orders them. A data dependency on the gradient
  fixes both (this is `tf.recompute_grad`'s trick, with an `is_nan` select
  instead of its `b == b` on booleans, which XLA may simplify for integers).
* `barrier(tensors)`: under XLA, a fusion barrier at block boundaries,
  which keeps a block's rebuilt inputs and gradients from being fused into
  (and so keeping alive buffers for) the computations of the blocks below.
* `seed_state_variables(layer)` / `snapshot(variables)`: the states of the
  `keras.random.SeedGenerator`s inside a layer, and a copy of their current
  values. Running the layer again inside
  `keras.StatelessScope(state_mapping=zip(variables, snapshot))` makes every
  dropout mask and every LSH rotation it draws the same as the first time.
"""

import contextlib

import tensorflow as tf

# No public API stops all tapes at once (tf.recompute_grad uses the same
# private module) or tells whether a graph is being compiled by XLA.
from keras_reformer._compat import control_flow_util, gradient_registry, tape_record

# The name tf.custom_gradient gives each registration in graph mode.
CUSTOM_GRADIENT_PREFIX = "CustomGradient-"


@contextlib.contextmanager
def stop_recording():
    """Context in which no gradient tape records operations."""
    with tape_record.stop_recording():
        yield


@contextlib.contextmanager
def throwaway_trace():
    """Context for a trace that is never differentiated (a symbolic call).

    In graph mode every `tf.custom_gradient` registers its gradient function
    in TensorFlow's global registry under a fresh name, and never removes it;
    the function's closure holds the traced tensors, so each trace keeps its
    whole graph alive (measured: ~12 MB per reversible Reformer block for the
    symbolic calls that build a stack). The registrations made inside this
    context are removed on exit, which lets those graphs be freed.
    """
    before = set(gradient_registry.list())
    try:
        yield
    finally:
        for name in set(gradient_registry.list()) - before:
            if name.startswith(CUSTOM_GRADIENT_PREFIX):
                del gradient_registry._registry[name]


def dependency_zero(grad):
    """A float32 scalar that is exactly 0 (NaN if `grad` starts with NaN).

    Reads a single element of `grad`, so it costs nothing, but XLA cannot
    know its value and so cannot merge what depends on it with the forward.
    """
    grad = tf.convert_to_tensor(grad)
    first = tf.reshape(grad, [-1])[:1]
    # reduce_max of an empty tensor is -inf: still gives 0 below.
    elem = tf.reduce_max(tf.cast(first, tf.float32))
    return tf.where(tf.math.is_nan(elem), elem, tf.zeros_like(elem))


def gradient_dependency(tensors, grads):
    """Returns `tensors` (a list) plus an exact zero computed from `grads`.

    Use on the inputs of a recomputation in a backward pass, with the
    gradient that the recomputation's results will be multiplied by, so that
    the recomputation runs after that gradient exists and is not merged
    with the forward pass by XLA. `grads` may be one tensor or a list (e.g.
    also the weight gradients of the block done before, so that the executor
    finishes them, and frees what they read, before the next recomputation).
    """
    if tf.executing_eagerly():
        return list(tensors)  # eager runs in program order; nothing to merge
    grads = grads if isinstance(grads, (list, tuple)) else [grads]
    zero = tf.add_n([dependency_zero(g) for g in grads if g is not None])
    return [t + tf.cast(zero, t.dtype) for t in tensors]


def in_xla_context():
    """True while tracing a function that XLA will compile (jit_compile=True)."""
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def barrier(tensors):
    """Under XLA, materializes `tensors` behind a fusion barrier; else a no-op.

    Returns the same values. Under XLA they come out of a `while` loop that
    XLA cannot prove runs exactly once, so: all inputs are computed before
    any output is used (ordering), XLA cannot see that the outputs equal the
    inputs (no merging with the forward pass), and no elementwise fusion
    crosses it. Without it, XLA fused each rebuilt block input `y - g(y1)`
    into the consumers of the blocks below, which kept every block's
    recomputed outputs alive until the bottom block: memory grew with depth
    as without reversibility. (`XlaOptimizationBarrier`, what
    `jax.checkpoint` uses, is removed early by XLA's CPU pipeline and did
    not help.)
    """
    tensors = list(tensors)
    if not tensors or not in_xla_context():
        return tensors
    # 1 at run time; data-dependent, so XLA cannot unroll or remove the loop.
    count = 1 + tf.cast(tf.math.is_nan(dependency_zero(tensors[0])), tf.int32)

    def body(i, *values):
        zero = tf.cast(i, tf.float32) * 0.0  # exact; depends on the loop
        return (i + 1,) + tuple(v + tf.cast(zero, v.dtype) for v in values)

    out = tf.while_loop(
        lambda i, *_: i < count, body, [tf.constant(0)] + tensors,
        parallel_iterations=1,
    )
    return list(out[1:])


def seed_state_variables(layer):
    """The state variables of every SeedGenerator inside `layer` (recursive).

    Keras layers track their `SeedGenerator`s in `_seed_generators` and list
    the states in `layer.variables`; a variable named `seed_generator_state`
    is caught too, in case a generator is held somewhere Keras does not track
    as a generator.
    """
    tracked = set()
    for sublayer in layer._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(sublayer, "_seed_generators", []):
            tracked.add(id(generator.state))
    states, seen = [], set()
    for variable in layer.variables:
        if id(variable) in seen:
            continue
        name = getattr(variable, "name", "") or ""
        if id(variable) in tracked or (
            not variable.trainable and name.endswith("seed_generator_state")
        ):
            states.append(variable)
            seen.add(id(variable))
    return states


def snapshot(variables):
    """Copies of the current values of `variables` (read in program order)."""
    return [tf.identity(tf.convert_to_tensor(v.value)) for v in variables]
