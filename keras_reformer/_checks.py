"""Argument checks shared by every public class.

Each raises a `ValueError` that names the argument, the value received and
what is allowed, in Keras' wording ("Received: name=value"). Like Keras'
own layers, a value of the wrong type is a `ValueError` too, so callers
catch one exception type for every bad argument. `describe` shows a bad
value the same way in messages written elsewhere.
"""

import numpy as np
import tensorflow as tf


def _is_int(value):
    # NumPy ints count (a config built from arrays holds them); bools do not.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def describe(value):
    """`repr(value)`, cut to 200 characters, or dtype and shape for a
    tensor or array: what a message shows of a bad value."""
    if isinstance(value, (tf.Tensor, tf.RaggedTensor, np.ndarray)):
        return f"<{type(value).__name__} dtype={value.dtype.name} shape={tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def positive_int(name, value, allow_none=False):
    """`value` as a python int if it is an int >= 1 (or None when `allow_none`)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        allowed = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return int(value)


def non_negative_int(name, value):
    """`value` as a python int if it is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative integer. Received: {name}={value!r}"
        )
    return int(value)


def int_in_range(name, value, low, high=None, why=""):
    """`value` as a python int if it is an int in `[low, high]` (no upper
    bound when `high` is None). `why`, if given, follows the range in the
    message, e.g. "(the backbone's position limit)"."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        why = f" {why}" if why else ""
        raise ValueError(f"`{name}` must be {allowed}{why}. Received: {name}={value!r}")
    return int(value)


def rate(name, value):
    """`value` as a float if it is a number in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"`{name}` must be a float in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


def positive_number(name, value):
    """`value` as a float if it is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return float(value)


def one_of(name, value, allowed):
    """`value` if it is one of `allowed` (listed in the message in their
    order when a list or tuple, sorted otherwise)."""
    if value not in allowed:
        shown = list(allowed) if isinstance(allowed, (list, tuple)) else sorted(allowed, key=repr)
        raise ValueError(f"`{name}` must be one of {shown}. Received: {name}={value!r}")
    return value


def boolean(name, value):
    """`value` as a python bool if it is a bool or NumPy bool (a truthy
    string like "no" is refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def auto_or_boolean(name, value):
    """`value` if it is "auto", else as a python bool (see `boolean`)."""
    if isinstance(value, str) and value == "auto":
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"`{name}` must be one of 'auto', True or False. Received: {name}={value!r}"
        )
    return bool(value)


def instance(name, value, classes, allowed, allow_none=False):
    """`value` if it is an instance of `classes` (or None when
    `allow_none`); `allowed` says what is in the message, e.g.
    "a keras_reformer ReformerBackbone"."""
    if value is None and allow_none:
        return None
    if not isinstance(value, classes):
        allowed = f"None or {allowed}" if allow_none else allowed
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={describe(value)}")
    return value


def positive_int_pair(name, value):
    """`value` as a tuple if it is a list or tuple of two positive ints."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_is_int(v) and v > 0 for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a pair of positive integers. Received: {name}={value!r}"
        )
    return tuple(value)


def sequence_length(inputs, max_sequence_length, detail):
    """Length of `inputs` (axis 1), checked against `max_sequence_length`.

    A static length that is too long raises a `ValueError` now; a dynamic
    one gets a run-time assertion (an `InvalidArgumentError`), which XLA
    drops. Returns the static int when known, else an int32 scalar tensor
    that depends on the assertion. `detail` follows "Input length ..." in
    both messages.
    """
    length = inputs.shape[1]
    if length is not None:
        if length > max_sequence_length:
            raise ValueError(f"Input length {length} {detail}")
        return length
    length = tf.shape(inputs)[1]
    check = tf.debugging.assert_less_equal(
        length, max_sequence_length, message=f"Input length {detail}"
    )
    with tf.control_dependencies([check]):
        return tf.identity(length)


def keras_positive_int(name, value, allow_none=False):
    """`value` if it is an int >= 1 (or None when `allow_none`), refused in
    `MultiHeadAttention`'s own wording, for the arguments a drop-in shares
    with it."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value <= 0:
        expected = "a positive integer or `None`" if allow_none else "a positive integer"
        raise ValueError(
            f"Received an invalid value for argument `{name}`, expected "
            f"{expected}. Received: {name}={value}"
        )
    return value


def output_shape(value):
    """`output_shape` as a tuple of positive ints (an int is a 1-tuple), or
    None when it is empty or None; `MultiHeadAttention`'s wording."""
    if not value:
        return None
    if isinstance(value, int):
        value = (value,)
    try:
        shape = tuple(value)
    except TypeError:
        shape = None
    if shape is None or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(
            f"Invalid `output_shape`: {value!r}. When specified, the "
            "`output_shape` should be of type tuple, list, or int, of positive "
            "integers."
        )
    return shape


def int_tuple(name, value, allow_none=False):
    """`value` as a tuple of ints if it is an int, list or tuple of ints (or
    None when `allow_none`)."""
    if value is None and allow_none:
        return None
    if _is_int(value):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        allowed = "an int, list, or tuple of ints"
        if allow_none:
            allowed = "None or " + allowed
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return tuple(value)


def even_int_or_pair(name, value, minimum=2, allow_none=False):
    """`value` if it is an even int >= `minimum`, or a pair of them (as a
    tuple), or None when `allow_none`."""
    def ok(n):
        return _is_int(n) and n >= minimum and n % 2 == 0

    if value is None and allow_none:
        return None
    if ok(value):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(ok(n) for n in value):
        return tuple(value)
    allowed = (f"an even integer >= {minimum} or a pair of even integers "
               f">= {minimum}")
    if allow_none:
        allowed = "None, " + allowed
    raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
