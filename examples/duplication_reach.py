"""Why an LSH model misses on the duplication task: reach, buckets, or learning.

On `0 w 0 w` the query at input position p (second copy) must attend to the
key at p - (half - 1), the position holding the symbol it has to emit. A
causal LSHAttention query sees only the `num_chunks_before * bucket_size`
most recent keys of its own bucket (see `LSHAttention`), so in each hash
round the target key is either

- in another bucket (the hash split them),
- in the query's bucket but crowded out (more than `reach` same-bucket keys
  between them), or
- in reach.

This script loads weights saved by `duplication_task.py --weights-dir`,
records the buckets the model's own forward pass uses, classifies every
second-copy query by brute force from those buckets (independently of the
attention code), and prints the accuracy within each class. It then
evaluates the same weights with a longer reach (`num_chunks_before` 2 and 4,
no retraining): if misses are reach misses, accuracy follows the reach.

    python examples/duplication_task.py --train-rounds 2 4 --weights-dir runs/dup
    python examples/duplication_reach.py --weights-dir runs/dup --train-rounds 2 4

`--smoke` runs the whole analysis in a few seconds on a small untrained
model (saved first to a temporary `--weights-dir` when none is given): it
checks that the script runs, not what a trained model does.
"""

import argparse
import os
import sys
import tempfile

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_reformer as kr  # noqa: E402
from duplication_task import (  # noqa: E402
    accuracy, add_model_arguments, held_out_data, make_model, set_num_hashes,
    write_csv,
)


def attention_layers(model):
    return [layer for layer in model._flatten_layers()
            if isinstance(layer, kr.layers.LSHAttention)]


def record_buckets(model, inputs):
    """Buckets (B, H, R, L) of the single attention layer in a forward pass."""
    (layer,) = attention_layers(model)
    seen = []
    original = layer.hash_buckets

    def recording(*args, **kwargs):  # whatever hash_buckets takes, passed on
        buckets, total = original(*args, **kwargs)
        seen.append(np.asarray(buckets))
        return buckets, total

    layer.hash_buckets = recording
    try:
        logits = model({"token_ids": inputs, "padding_mask": np.ones_like(inputs)},
                       training=False)
    finally:
        del layer.hash_buckets
    return np.asarray(logits), seen[-1]


def classify(buckets, length, reach):
    """Per (batch, query) class over all heads and rounds, by brute force.

    Returns (B, half - 1) int: 2 if the target key is in reach in some
    (head, round), else 1 if it shares the query's bucket somewhere (but is
    crowded out), else 0 (split by the hash in every head and round).
    """
    half = length // 2
    batch, heads, rounds, _ = buckets.shape
    queries = range(half, length - 1)  # input positions of second-copy targets
    result = np.zeros((batch, len(queries)), np.int64)
    for qi, p in enumerate(queries):
        j = p - (half - 1)
        own = buckets[..., p]  # (B, H, R)
        same = buckets[..., j] == own
        # Slot distance in sorted order = same-bucket positions in (j, p].
        between = (buckets[..., j + 1:p + 1] == own[..., None]).sum(-1)
        in_reach = same & (between <= reach)
        cls = np.where(in_reach.any(axis=(1, 2)), 2, np.where(same.any(axis=(1, 2)), 1, 0))
        result[:, qi] = cls
    return result


def accuracy_with_reach(model, data, chunks_before):
    for layer in attention_layers(model):
        layer.num_chunks_before = chunks_before
    model.predict_function = None  # traced with the old reach
    return accuracy(model, data)


def weights_path(weights_dir, train_rounds):
    """Where duplication_task.py --weights-dir saves the LSH-`train_rounds` model."""
    return os.path.join(weights_dir, f"LSH-{train_rounds}.weights.h5")


def save_untrained(args):
    """A temporary weights directory holding untrained models (for --smoke)."""
    weights_dir = tempfile.mkdtemp(prefix="duplication_reach_smoke_")
    for train_rounds in args.train_rounds:
        make_model(args, train_rounds).save_weights(weights_path(weights_dir, train_rounds))
    return weights_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-dir", default=None,
                   help="the --weights-dir given to duplication_task.py (required "
                        "unless --smoke)")
    p.add_argument("--train-rounds", type=int, nargs="+", default=[2])
    p.add_argument("--eval-rounds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds on a small untrained model (see above)")
    p.add_argument("--csv", default=None,
                   help="also write the classes to this CSV (one row per trained "
                        "and evaluated number of rounds)")
    add_model_arguments(p)  # as given to duplication_task.py
    args = p.parse_args(argv)
    if args.smoke:
        args.length, args.hidden_dim, args.eval_samples = 64, 32, 8
        args.train_rounds, args.eval_rounds = [1], [1, 2]
        if args.weights_dir is None:
            args.weights_dir = save_untrained(args)
    elif args.weights_dir is None:
        p.error("--weights-dir is required (the directory duplication_task.py "
                "--weights-dir saved the models to), unless --smoke")
    data = held_out_data(args)
    inputs, targets, _ = data
    half = args.length // 2
    names = ("split by the hash", "same bucket, crowded out", "in reach")
    rows = []
    for train_rounds in args.train_rounds:
        model = make_model(args, train_rounds)
        model.load_weights(weights_path(args.weights_dir, train_rounds))
        (layer,) = attention_layers(model)
        reach = layer.num_chunks_before * layer.bucket_size
        print(f"\n## trained LSH-{train_rounds} ({layer.resolved_num_buckets} buckets, "
              f"reach {reach})")
        for rounds in args.eval_rounds:
            set_num_hashes(model, rounds)
            logits, buckets = record_buckets(model, inputs)
            hits = logits.argmax(-1)[:, half:] == targets[:, half:]
            cls = classify(buckets, args.length, reach)
            cells = []
            row = {"train": f"LSH-{train_rounds}", "eval": f"LSH-{rounds}",
                   "accuracy": f"{100 * hits.mean():.1f}%"}
            for c, name in enumerate(names):
                sel = cls == c
                acc = f"{100 * hits[sel].mean():.1f}%" if sel.any() else "-"
                cells.append(f"{name}: {100 * sel.mean():.1f}% of queries, accuracy {acc}")
                row[name] = f"{100 * sel.mean():.1f}% ({acc})"
            used = len(np.unique(buckets[..., :args.length - 1]))
            print(f"eval LSH-{rounds}: accuracy {100 * hits.mean():.1f}%; "
                  + "; ".join(cells) + f"; {used} buckets used")
            rows.append({**row, "buckets_used": used})
        set_num_hashes(model, train_rounds)
        for chunks_before in (1, 2, 4):
            acc = accuracy_with_reach(model, data, chunks_before)
            print(f"eval LSH-{train_rounds}, num_chunks_before={chunks_before} "
                  f"(reach {chunks_before * args.bucket_size}): accuracy {100 * acc:.1f}%")
            for row in rows:
                if row["train"] == f"LSH-{train_rounds}" and row["eval"] == row["train"]:
                    row[f"reach_{chunks_before * args.bucket_size}"] = f"{100 * acc:.1f}%"
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
