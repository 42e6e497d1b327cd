"""The Reformer paper's duplication task, trained and evaluated with LSH-n.

Sequences are `0 w 0 w`: `w` is a random string of symbols `1..vocab-1`; a
one-layer causal model must copy the first `w` when producing the second,
which needs attention over half the sequence. The loss (and accuracy) counts
the second copy only. Each model is trained with some number of hash rounds
and evaluated with several (`num_hashes` can change after training), giving
the paper's table (Kitaev et al., 2020, section 2): rows train rounds, columns eval
rounds.

A full-attention row (`--full-attention`, on by default) trains the same
one-layer model with `keras.layers.MultiHeadAttention` (causal, learned
positions) on the same batches: the reference that tells a slow LSH learner
from a bug. Held-out accuracy is measured every `--eval-every` steps, logged
to TensorBoard (`--logdir`) and drawn into `--plot`.

    python examples/duplication_task.py                 # ~20 min on 2 CPU cores
    python examples/duplication_task.py --length 1024 --steps 20000   # paper-sized
    python examples/duplication_task.py --smoke
    python examples/duplication_task.py --axial-shape 3 127 --weights-dir runs/dup127

On the default 16 x 16 position grid the LSH models stall below full
attention because a one-layer shared-QK model must map positions p and
p - 127 to one direction, which that grid makes impossible for some
columns; a 3 x 127 grid (p and p - 127 share a column) reaches 100%.
`duplication_reach.py` shows where every miss comes from
(docs/duplication_task.md).
    tensorboard --logdir runs/duplication_task
"""

import argparse
import os
import sys
import tempfile
import time

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)
import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_reformer as kr  # noqa: E402


def duplication_batch(rng, batch, length, vocab):
    """(inputs, targets, weights): next-token prediction on `0 w 0 w`."""
    half = length // 2
    w = rng.integers(1, vocab, size=(batch, half - 1))
    zeros = np.zeros((batch, 1), np.int64)
    seq = np.concatenate([zeros, w, zeros, w], axis=1).astype(np.int32)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    weights = np.zeros(targets.shape, np.float32)
    weights[:, half:] = 1.0  # targets that are the second copy of w
    return inputs, targets, weights


def make_model(args, rounds):
    """A one-layer `ReformerCausalLM` (logits out) on a `ReformerBackbone`."""
    backbone = kr.models.ReformerBackbone(
        vocabulary_size=args.vocab, num_layers=1, hidden_dim=args.hidden_dim,
        num_heads=4, intermediate_dim=args.hidden_dim, bucket_size=args.bucket_size,
        num_hashes=rounds, max_sequence_length=args.length, causal=True,
        axial_shape=tuple(args.axial_shape) if args.axial_shape else None,
        value_shift=args.value_shift == "on", seed=args.seed,
    )
    return kr.models.ReformerCausalLM(backbone)


def set_num_hashes(model, rounds):
    """Evaluate `model` (a `ReformerCausalLM`) with `rounds` hash rounds: the
    backbone's `set_num_hashes`, and the task's traced functions dropped
    (they baked the old value in)."""
    model.backbone.set_num_hashes(rounds)
    model.predict_function = model.test_function = model.train_function = None


def make_full_attention_model(args):
    """The same one-layer model with full causal attention (the reference)."""
    width = args.length - 1  # inputs are the sequence without its last symbol
    ids = keras.Input((width,), dtype="int32", name="token_ids")
    mask = keras.Input((width,), dtype="int32", name="padding_mask")
    d = args.hidden_dim
    positions = keras.ops.arange(width)
    x = keras.layers.Embedding(args.vocab, d)(ids)
    x = x + keras.layers.Embedding(args.length, d)(positions)[None]
    y = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.MultiHeadAttention(4, d // 4)(y, y, use_causal_mask=True)
    y = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.Dense(d)(keras.layers.Dense(d, activation="gelu")(y))
    logits = keras.layers.Dense(args.vocab)(keras.layers.LayerNormalization()(x))
    return keras.Model({"token_ids": ids, "padding_mask": mask}, logits)


def add_model_arguments(p):
    """The options that fix a model's shape and the held-out data: shared
    with duplication_reach.py, which rebuilds the models trained here."""
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--bucket-size", type=int, default=16)
    p.add_argument("--axial-shape", type=int, nargs=2, default=None,
                   help="the LSH models' position grid (default: derived, 16 x 16 "
                        "at length 256)")
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--value-shift", choices=["on", "off"], default="off",
                   help="on: LSH models with ReformerBackbone(value_shift=True), keys "
                        "bring the next position's value (docs/model.md); off (the "
                        "default): the paper's attention")


def held_out_data(args):
    """The held-out sequences every model is scored on (fixed seed)."""
    return duplication_batch(np.random.default_rng(10**6), args.eval_samples,
                             args.length, args.vocab)


def accuracy(model, data):
    inputs, targets, weights = data
    # A tf.data pipeline: keras-hub's `predict` would batch arrays through
    # grain, which warns about its thread pool at every call.
    batches = tf.data.Dataset.from_tensor_slices(
        {"token_ids": inputs, "padding_mask": np.ones_like(inputs)}).batch(32)
    logits = model.predict(batches, verbose=0)
    hits = (logits.argmax(-1) == targets) * weights
    return float(hits.sum() / weights.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--train-rounds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval-rounds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--no-full-attention", dest="full_attention", action="store_false",
                   help="skip the MultiHeadAttention reference row")
    p.add_argument("--eval-every", type=int, default=500,
                   help="held-out accuracy every this many steps (the curves)")
    p.add_argument("--logdir", default=os.path.join("runs", "duplication_task"),
                   help="TensorBoard logs (one folder per model)")
    p.add_argument("--plot", default=None,
                   help="accuracy-vs-step figure (default docs/duplication_task.png; "
                        "none with --smoke)")
    p.add_argument("--weights-dir", default=None,
                   help="save each trained LSH model's weights here "
                        "(LSH-<rounds>.weights.h5), e.g. for duplication_reach.py")
    p.add_argument("--csv", default=None,
                   help="also write the table to this CSV (one row per model and "
                        "evaluation; what docs/duplication_task.md shows)")
    p.add_argument("--no-jit", dest="jit", action="store_false")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.length, args.steps, args.hidden_dim, args.eval_samples = 64, 4, 32, 16
        args.train_rounds, args.eval_rounds, args.eval_every = [1], [1, 2], 2
        if args.logdir == os.path.join("runs", "duplication_task"):
            args.logdir = tempfile.mkdtemp(prefix="duplication_smoke_")
    elif args.plot is None:
        args.plot = os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "docs", "duplication_task.png")
    if args.length % 2 or args.length < 4:
        p.error(f"--length must be even and >= 4, got {args.length}")
    if args.eval_every < 1:
        p.error(f"--eval-every must be >= 1, got {args.eval_every}")

    held_out = held_out_data(args)
    table, curves, seconds = {}, {}, {}
    kinds = [f"LSH-{r}" for r in args.train_rounds]
    if args.full_attention:
        kinds.append("full")
    for kind in kinds:
        keras.utils.set_random_seed(args.seed)
        rng = np.random.default_rng(args.seed)  # the same batches for every model
        if kind == "full":
            model = make_full_attention_model(args)
        else:
            model = make_model(args, int(kind[4:]))
        # No metrics: a ReformerCausalLM comes compiled with a weighted
        # accuracy, which `weighted_metrics=None` would leave in place.
        model.compile(keras.optimizers.Adam(args.learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[], jit_compile=args.jit)
        writer = tf.summary.create_file_writer(os.path.join(args.logdir, kind))
        curves[kind] = []
        start = time.time()
        progress = keras.utils.Progbar(args.steps, stateful_metrics=["loss"])
        for step in range(args.steps):
            x, y, w = duplication_batch(rng, args.batch_size, args.length, args.vocab)
            loss = model.train_on_batch(
                {"token_ids": x, "padding_mask": np.ones_like(x)}, y, sample_weight=w,
                return_dict=True,
            )["loss"]
            progress.update(step + 1, [("loss", float(np.asarray(loss)))])
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                acc = accuracy(model, held_out)
                curves[kind].append((step + 1, acc))
                with writer.as_default():
                    tf.summary.scalar("held_out_accuracy", acc, step=step + 1)
                    tf.summary.scalar("loss", float(np.asarray(loss)), step=step + 1)
        writer.flush()
        seconds[kind] = time.time() - start
        print(f"trained {kind} for {args.steps} steps in {seconds[kind]:.0f}s")
        if args.weights_dir and kind != "full":
            os.makedirs(args.weights_dir, exist_ok=True)
            model.save_weights(os.path.join(args.weights_dir, f"{kind}.weights.h5"))
        if kind == "full":
            table["full"] = curves[kind][-1][1]
            continue
        for eval_rounds in args.eval_rounds:
            set_num_hashes(model, eval_rounds)
            table[int(kind[4:]), eval_rounds] = accuracy(model, held_out)
    if args.plot:
        plot_curves(curves, args, args.plot)

    print(f"\nAccuracy on the second copy (length {args.length}, "
          f"{args.steps} steps of batch {args.batch_size}):")
    header = "| train \\ eval | " + " | ".join(f"LSH-{r}" for r in args.eval_rounds) + " |"
    print(header)
    print("|" + "---|" * (len(args.eval_rounds) + 1))
    for rounds in args.train_rounds:
        cells = " | ".join(f"{100 * table[rounds, r]:.1f}%" for r in args.eval_rounds)
        print(f"| LSH-{rounds} | {cells} |")
    if "full" in table:
        print(f"| full attention (MultiHeadAttention) | {100 * table['full']:.1f}% "
              f"(every column) |")
    if args.csv:
        write_csv(args.csv, csv_rows(args, table, seconds))
    return table


def csv_rows(args, table, seconds):
    """One row per (trained model, evaluation): the LSH models once per
    evaluated number of rounds, full attention once (eval "no hashing")."""
    grid = "x".join(map(str, args.axial_shape)) if args.axial_shape else "derived"
    common = {"length": args.length, "steps": args.steps, "batch": args.batch_size,
              "grid": grid, "value_shift": args.value_shift}
    rows = []
    for kind, train_s in seconds.items():
        if kind == "full":
            cells = [("no hashing", table["full"])]
            model = "full attention (MultiHeadAttention)"
        else:
            cells = [(f"LSH-{r}", table[int(kind[4:]), r]) for r in args.eval_rounds]
            model = kind
        for eval_name, acc in cells:
            rows.append({**common, "model": model, "eval": eval_name,
                         "accuracy": f"{100 * acc:.1f}%", "train_s": f"{train_s:.0f}"})
    return rows


def write_csv(path, rows):
    """`rows` (dicts) to `path`, replacing it; a key missing from a row is an
    empty cell."""
    import csv

    fields = list(dict.fromkeys(key for row in rows for key in row))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot_curves(curves, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, points in curves.items():
        steps, accs = zip(*points)
        ax.plot(steps, [100 * a for a in accs], marker="o", label=f"{kind} (trained)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy on the second copy (%)")
    ax.set_title(f"Duplication task, length {args.length}, batch {args.batch_size}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
