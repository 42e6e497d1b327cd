"""Local attention: each chunk of positions attends to itself and its
neighbouring chunks, its parts side by side.

`local_attention.LocalAttention` (exported as
`keras_reformer.layers.LocalAttention`) projects its input and calls into:

- `windows`: the sequence cut into chunks, each chunk's window of
  neighbouring chunks, and the window's mask (padding, causality, an
  `attention_mask`);
- `decoding`: cached one-token causal decoding from a ring buffer of the
  last window's keys and values.

The score arithmetic (mask value) is LSH attention's, `lsh.scores`.
"""
