"""Bits per byte of n-gram count models on the main job's validation bytes.

A yardstick for `examples/train_lm.py`: an order-n byte model (counts of
the training files, add-alpha smoothing over 256 bytes) scored on exactly
the bytes the example validates on (the targets of its first
`--validation-steps` validation batches). A neural byte LM that is not
below the bigram row has not yet learned to use the bytes before the last
one.

    python benchmarks/ngram_baseline.py                 # the example's defaults
    python benchmarks/ngram_baseline.py --seq-len 8192 --batch-size 1 --validation-steps 4  # the old default
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_reformer import data  # noqa: E402


def contexts(stream, order):
    """Integer code of the `order` bytes before each position (0-padded)."""
    code = np.zeros(len(stream), np.int64)
    for back in range(1, order + 1):
        previous = np.concatenate([np.zeros(back, np.int64), stream[:-back]])
        code = code * 256 + previous
    return code


def bits_per_byte(train, scored, order, alpha):
    """Mean -log2 p(byte | previous `order` bytes) over `scored`."""
    train_ctx, scored_ctx = contexts(train, order), contexts(scored, order)
    joint, joint_counts = np.unique(train_ctx * 256 + train, return_counts=True)
    ctx, ctx_counts = np.unique(train_ctx, return_counts=True)

    def counts(keys, table, values):
        index = np.searchsorted(table, keys)
        index = np.minimum(index, len(table) - 1)
        return np.where(table[index] == keys, values[index], 0)

    pair = counts(scored_ctx * 256 + scored, joint, joint_counts)
    total = counts(scored_ctx, ctx, ctx_counts)
    return float(-np.mean(np.log2((pair + alpha) / (total + 256 * alpha))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--validation-steps", type=int, default=8)
    p.add_argument("--max-order", type=int, default=4)
    args = p.parse_args(argv)
    train_files, val_files = data.split_files(data.default_corpus_files())
    train = np.frombuffer(
        b"".join(open(f, "rb").read() for f in train_files), np.uint8
    ).astype(np.int64)
    val = data.lm_dataset(val_files, args.seq_len, args.batch_size, shuffle=False,
                          with_padding_mask=False)
    scored = np.concatenate(
        [y.numpy().reshape(-1) for _, y in val.take(args.validation_steps)]
    ).astype(np.int64)
    print(f"{len(train):,} training bytes; {len(scored):,} validation bytes scored")
    print("| order (bytes of context) | bits per byte |\n|---|---|")
    for order in range(args.max_order + 1):
        # Smoothing that suits each order's sparsity (chosen on these files).
        alpha = 0.1 if order < 2 else 0.01
        print(f"| {order} | {bits_per_byte(train, scored, order, alpha):.3f} |")


if __name__ == "__main__":
    main()
