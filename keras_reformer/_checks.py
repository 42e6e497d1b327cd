"""Argument checks shared by every public class.

Each raises a `ValueError` (or `TypeError` for the wrong kind of value) that
names the argument, the value received and what is allowed, in Keras'
wording ("Received: name=value").
"""


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


def one_of(name, value, allowed):
    """`value` if it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {sorted(allowed)}. Received: {name}={value!r}"
        )
    return value
