"""Argument checks shared by every public class.

Each raises a `ValueError` that names the argument, the value received and
what is allowed, in Keras' wording ("Received: name=value"). Like Keras'
own layers, a value of the wrong type is a `ValueError` too, so callers
catch one exception type for every bad argument.
"""

import tensorflow as tf


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name, value, allow_none=False):
    """`value` if it is an int >= 1 (or None when `allow_none`)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        allowed = "None or a positive integer" if allow_none else "a positive integer"
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return value


def non_negative_int(name, value):
    """`value` if it is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative integer. Received: {name}={value!r}"
        )
    return value


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
    """`value` if it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {sorted(allowed)}. Received: {name}={value!r}"
        )
    return value


def boolean(name, value):
    """`value` if it is a bool (a truthy string like "no" is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
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
