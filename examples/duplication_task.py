"""The Reformer paper's duplication task, trained and evaluated with LSH-n.

Sequences are `0 w 0 w`: `w` is a random string of symbols `1..vocab-1`; a
one-layer causal model must copy the first `w` when producing the second,
which needs attention over half the sequence. The loss (and accuracy) counts
the second copy only. Each model is trained with some number of hash rounds
and evaluated with several (`num_hashes` can change after training), giving
the paper's table (REFORMER.md section 2): rows train rounds, columns eval
rounds.

    python examples/duplication_task.py                 # ~15 min on 2 CPU cores
    python examples/duplication_task.py --length 1024 --steps 20000   # paper-sized
    python examples/duplication_task.py --smoke
"""

import argparse
import os
import sys
import time

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)
import keras
import numpy as np

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
    return kr.models.ReformerModel(
        vocabulary_size=args.vocab, num_layers=1, hidden_dim=args.hidden_dim,
        num_heads=4, intermediate_dim=args.hidden_dim, bucket_size=args.bucket_size,
        num_hashes=rounds, max_sequence_length=args.length, causal=True,
        seed=args.seed,
    )


def accuracy(model, data):
    inputs, targets, weights = data
    logits = model.predict({"token_ids": inputs, "padding_mask": np.ones_like(inputs)},
                           batch_size=32, verbose=0)
    hits = (logits.argmax(-1) == targets) * weights
    return float(hits.sum() / weights.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--bucket-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--train-rounds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval-rounds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--no-jit", dest="jit", action="store_false")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.length, args.steps, args.hidden_dim, args.eval_samples = 64, 4, 32, 16
        args.train_rounds, args.eval_rounds = [1], [1, 2]
    if args.length % 2 or args.length < 4:
        p.error(f"--length must be even and >= 4, got {args.length}")

    rng = np.random.default_rng(args.seed)
    held_out = duplication_batch(np.random.default_rng(10**6), args.eval_samples,
                                 args.length, args.vocab)
    table = {}
    for rounds in args.train_rounds:
        keras.utils.set_random_seed(args.seed)
        model = make_model(args, rounds)
        model.compile(keras.optimizers.Adam(args.learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=args.jit)
        start = time.time()
        progress = keras.utils.Progbar(args.steps, stateful_metrics=["loss"])
        for step in range(args.steps):
            x, y, w = duplication_batch(rng, args.batch_size, args.length, args.vocab)
            loss = model.train_on_batch(
                {"token_ids": x, "padding_mask": np.ones_like(x)}, y, sample_weight=w
            )
            progress.update(step + 1, [("loss", float(np.asarray(loss)))])
        print(f"trained LSH-{rounds} for {args.steps} steps in {time.time() - start:.0f}s")
        for eval_rounds in args.eval_rounds:
            model.set_num_hashes(eval_rounds)
            table[rounds, eval_rounds] = accuracy(model, held_out)

    print(f"\nAccuracy on the second copy (length {args.length}, "
          f"{args.steps} steps of batch {args.batch_size}):")
    header = "| train \\ eval | " + " | ".join(f"LSH-{r}" for r in args.eval_rounds) + " |"
    print(header)
    print("|" + "---|" * (len(args.eval_rounds) + 1))
    for rounds in args.train_rounds:
        cells = " | ".join(f"{100 * table[rounds, r]:.1f}%" for r in args.eval_rounds)
        print(f"| LSH-{rounds} | {cells} |")
    return table


if __name__ == "__main__":
    main()
