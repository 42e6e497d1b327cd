"""Mapping over a dataset's whole elements."""


def map_elements(dataset, fn):
    """`dataset.map(fn)` with `fn` given each whole element.

    tf.data calls a tuple element's function with one argument per item;
    this packs them back, so `fn` sees `(x, y)` as one tuple either way.
    """
    if isinstance(dataset.element_spec, tuple):
        return dataset.map(lambda *element: fn(element))
    return dataset.map(fn)
