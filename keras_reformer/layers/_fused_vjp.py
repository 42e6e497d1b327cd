"""Blocks that give their output and VJP in one pass (ReversibleSequence's backward).

Rebuilding a block's inputs needs the block's output, and its gradient needs
the block's VJP with an upstream gradient that is already known. Run under a
tape, a block whose gradient is itself recomputing (ChunkedFeedForward) would
compute its forward twice: once for the output, once more in its gradient.
A block may instead offer

    value_and_vjp(inputs, dy, **call_kwargs) -> (outputs, targets, target_grads)

run under the caller's tape and seed replay, where `outputs` is what `call`
returns and `tape.gradient(targets, sources, output_gradients=target_grads)`
is the VJP (the tensors in `targets` were computed, under that tape, from
the inputs and the block's weights). `FeedForwardBlock` and
`ChunkedFeedForward` offer it; any other block goes through the tape.
"""

import contextlib

_state = {"enabled": True}


@contextlib.contextmanager
def disabled():
    """Blocks go through the generic tape while tracing inside this context.

    For tests and comparisons: the fused and the generic backward compute
    the same gradients.
    """
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def method_of(layer):
    """`layer.value_and_vjp` if the layer's backward may use it, else None."""
    if not _state["enabled"]:
        return None
    cls = type(layer)
    owner = _defining_class(cls, "value_and_vjp")
    if owner is None:
        return None
    # A subclass that changes `call` but inherits `value_and_vjp` would get
    # the gradient of its parent's computation: only use the method where
    # it was written together with (or after) the `call` it mirrors.
    if not issubclass(owner, _defining_class(cls, "call")):
        return None
    return layer.value_and_vjp


def _defining_class(cls, name):
    return next((c for c in cls.__mro__ if name in vars(c)), None)
