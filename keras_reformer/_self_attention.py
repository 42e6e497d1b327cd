"""The call convention of the library's self-attention layers."""

import keras
import tensorflow as tf

from keras_reformer import _checks


class SelfAttentionCall:
    """Mixin for a Keras self-attention layer called like `MultiHeadAttention`
    (`layer(query, value, key, ...)`) where `value` and `key` may only be the
    query itself.

    Keras converts each argument on its own (NumPy -> tensor, float64 or
    float32 -> the compute dtype), so `layer(x, x)` would reach `call` with
    two different tensors. Self-attention is decided here, on the objects the
    user passed, and only the query goes on to `call`. Attention scores are
    refused here too: these layers never form the dense score matrix.

    The output has the query's shape with `_output_shape` (or the query's
    features) last, and carries the query's Keras mask.
    """

    def __call__(self, *args, **kwargs):
        args = list(args)
        query = args[0] if args else kwargs.get("query")
        for index, name in ((1, "value"), (2, "key")):
            other = args[index] if len(args) > index else kwargs.get(name)
            if other is not None and other is not query:
                raise ValueError(
                    f"{type(self).__name__} is self-attention: `{name}` must "
                    "be omitted or be the query itself. Cross-attention is not "
                    "supported; use keras.layers.MultiHeadAttention for it."
                )
            kwargs.pop(name, None)
        if kwargs.get("return_attention_scores"):
            raise ValueError(
                f"{type(self).__name__} never forms the dense attention matrix, "
                "so `return_attention_scores=True` is not supported."
            )
        return super().__call__(*args[:1], **kwargs)

    @staticmethod
    def _checked_heads(num_heads, key_dim, value_dim):
        """(num_heads, key_dim, value_dim) checked as MultiHeadAttention
        checks them; `value_dim` None means `key_dim`."""
        num_heads = _checks.keras_positive_int("num_heads", num_heads)
        key_dim = _checks.keras_positive_int("key_dim", key_dim)
        value_dim = _checks.keras_positive_int("value_dim", value_dim, allow_none=True)
        return num_heads, key_dim, key_dim if value_dim is None else value_dim

    def _dropout(self, training):
        """(rate, seed) of the layer's attention dropout (`self.dropout`):
        (0, None) in inference. A stateless mask from a seed of the layer's
        generator: the same seed state (e.g. replayed by a reversible stack)
        gives the same mask."""
        if self.dropout > 0 and training:
            return self.dropout, tf.cast(self.seed_generator.next(), tf.int32)
        return 0.0, None

    def compute_mask(self, inputs, previous_mask=None):
        return previous_mask

    def compute_output_shape(self, query_shape, value_shape=None, key_shape=None):
        query_shape = tuple(query_shape)
        return query_shape[:-1] + (self._output_shape or (query_shape[-1],))

    def compute_output_spec(self, query, **kwargs):
        return keras.KerasTensor(
            self.compute_output_shape(query.shape), dtype=self.compute_dtype
        )
