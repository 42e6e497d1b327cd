"""LSH attention (Kitaev et al., 2020, section 2), its parts side by side.

`lsh_attention.LSHAttention` (exported as `keras_reformer.layers.LSHAttention`)
folds its input to (batch, length) by `attention_axes` and projects it, then
calls down, in the order data flows, into:

- `masks`: MultiHeadAttention's masks mapped to the folded input, and the
  keys some query may attend to;
- `value_shift`: values moved one real position back (`value_shift=True`);
- `hashing`: bucket counts and angular LSH, with the rotations of
  `rotations` (identical in eager mode, under XLA and in SavedModels);
- `sorting`: each hash round's order of positions by (bucket, position);
- `chunk_attention`: sorted chunks attending to their windows, a group of
  (batch, head) rows at a time, moved into sorted order and back by
  `permutation`;
- `dense_attention`: the exact dense path for short non-causal inputs;
- `scores`: the score arithmetic all paths share (unit keys, mask values,
  the rounds' combination);
- `decoding`: cached one-token causal decoding.
"""
