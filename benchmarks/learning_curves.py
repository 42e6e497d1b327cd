"""Validation bits per byte vs step: the Reformer against full attention.

Issue 14.2: on the default corpus (the Python standard library's sources,
`keras_reformer.data.default_corpus_files`), the same-size models trained
for the same steps on the same batches:

- `lsh2` (the reference Reformer: 2 hash rounds), `lsh1`, `lsh4`;
- `lsh2_plain`: `reversible=False` (ordinary residual stack, autodiff);
- `mha`: a pre-LayerNorm transformer of the same width, depth, heads and
  FFN built from `keras.layers.MultiHeadAttention` (full causal attention),
  learned position embeddings.

Every model (by default): 2 layers, d_model 256, 4 heads x 64, FFN 1024 (gelu), no
dropout, Adam with a 10% warm-up to `--learning-rate` and cosine decay to
10% of it, global-norm clip 1.0, graph mode. The validation bits per byte
are measured `--evals` times during training on the same first
`--val-batches` batches of the validation files. Each model trains in a
fresh process, one after the other.

    python benchmarks/learning_curves.py                     # 2K, 300 steps each
    python benchmarks/learning_curves.py --kinds lsh2 mha --steps 3000
    python benchmarks/learning_curves.py --kinds lsh2 mha --short-convolution 3 \
        --hidden-dim 128 --length 1024 --batch 4 --steps 1000 --evals 5 \
        --val-batches 8 --csv learning_curves_conv.csv   # the main job's shape

`--short-convolution W` adds a causal convolution of width W over the
embeddings to every model (ReformerModel's `short_convolution`; the same
`ShortConvolution` layer in `mha`). `--hidden-dim` sets d_model (FFN
4 x d_model, 4 heads).

Writes benchmarks/results/learning_curves.csv and docs/learning_curves.png.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

KINDS = ("lsh2", "lsh1", "lsh4", "lsh2_plain", "mha")
LAYERS, HEADS = 2, 4


def build(kind, length, width, hidden):
    import keras

    import keras_reformer as kr

    d_model, ffn = hidden, 4 * hidden
    if kind == "mha":
        tokens = keras.Input((length,), dtype="int32")
        x = keras.layers.Embedding(256, d_model)(tokens)
        x = x + keras.layers.Embedding(length, d_model)(keras.ops.arange(length))[None]
        if width:
            x = x + kr.layers.ShortConvolution(width)(x)
        for _ in range(LAYERS):
            y = keras.layers.LayerNormalization()(x)
            x = x + keras.layers.MultiHeadAttention(HEADS, d_model // HEADS)(
                y, y, use_causal_mask=True)
            y = keras.layers.LayerNormalization()(x)
            y = keras.layers.Dense(ffn, activation="gelu")(y)
            x = x + keras.layers.Dense(d_model)(y)
        x = keras.layers.LayerNormalization()(x)
        return keras.Model(tokens, keras.layers.Dense(256)(x))
    rounds = int(kind[3])
    backbone = kr.models.ReformerModel(
        256, num_layers=LAYERS, hidden_dim=d_model, num_heads=HEADS,
        intermediate_dim=ffn, num_hashes=rounds, max_sequence_length=length,
        reversible=not kind.endswith("_plain"), seed=0,
        short_convolution=width or None,
    )
    tokens = keras.Input((length,), dtype="int32")
    return keras.Model(tokens, backbone(
        {"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}))


def point(kind, length, batch, steps, evals, val_batches, learning_rate, width, hidden):
    import keras

    from keras_reformer import data

    keras.utils.set_random_seed(0)
    train_files, val_files = data.split_files(data.default_corpus_files())
    train = data.lm_dataset(train_files, length, batch, seed=0,
                            with_padding_mask=False)
    val = data.lm_dataset(val_files, length, batch, shuffle=False,
                          with_padding_mask=False).take(val_batches).cache()
    model = build(kind, length, width, hidden)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.1, warmup_target=learning_rate,
        warmup_steps=max(1, steps // 10))
    model.compile(keras.optimizers.Adam(schedule, global_clipnorm=1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.time()
    # validation_steps given: Keras 3.15 in graph mode divides the summed loss
    # of a finite dataset of unknown cardinality and static batch shape by
    # one step too many (val_batches + 1) for a fresh model.
    history = model.fit(train, epochs=evals, steps_per_epoch=steps // evals,
                        validation_data=val, validation_steps=val_batches, verbose=0)
    nats = history.history["val_loss"]
    _common.emit({
        "kind": kind, "length": length, "batch": batch, "steps": steps,
        "short_convolution": width, "hidden_dim": hidden,
        "params": model.count_params(), "seconds": round(time.time() - start),
        "val_bits": [round(v / math.log(2), 4) for v in nats],
        "train_bits": [round(v / math.log(2), 4) for v in history.history["loss"]],
    })


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        evals = len(row["val_bits"])
        steps = [row["steps"] // evals * (i + 1) for i in range(evals)]
        ax.plot(steps, row["val_bits"], marker="o", label=row["kind"])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Byte LM, length {rows[0]['length']}, batch {rows[0]['batch']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--evals", type=int, default=3)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--short-convolution", type=int, default=0)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--csv", default="learning_curves.csv")
    parser.add_argument("--point", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        kind, *numbers = args.point
        length, batch, steps, evals, val_batches = map(int, numbers[:5])
        return point(kind, length, batch, steps, evals, val_batches, float(numbers[5]),
                     int(numbers[6]), int(numbers[7]))
    if args.short_convolution < 0:
        parser.error(f"--short-convolution must be >= 0. Received: {args.short_convolution}")
    for name in ("length", "batch", "steps", "evals", "val_batches", "hidden_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1. "
                         f"Received: {getattr(args, name)}")
    if args.steps % args.evals:
        parser.error(f"--steps ({args.steps}) must be a multiple of --evals ({args.evals})")
    rows = []
    for kind in args.kinds:
        _common.progress(f"{kind}: {args.steps} steps")
        record = _common.run_point(os.path.abspath(__file__), [
            kind, args.length, args.batch, args.steps, args.evals,
            args.val_batches, args.learning_rate, args.short_convolution,
            args.hidden_dim], timeout=6 * 3600)
        _common.progress(f"  {record}")
        if record.get("status") == "ok":
            rows.append(record)
    path = _common.write_csv(args.csv, [
        dict(r, val_bits=" ".join(map(str, r["val_bits"])),
             train_bits=" ".join(map(str, r["train_bits"]))) for r in rows])
    print(f"wrote {path}")
    if rows:
        plot(rows, os.path.join(_common.DOCS, os.path.splitext(args.csv)[0] + ".png"))
        print("| model | val bits per byte at each eval | vs mha (last) | seconds |")
        print("|---|---|---|---|")
        ref = next((r["val_bits"][-1] for r in rows if r["kind"] == "mha"), None)
        for r in rows:
            ratio = f"{r['val_bits'][-1] / ref:.3f}x" if ref else "-"
            print(f"| {r['kind']} | {', '.join(map(str, r['val_bits']))} | {ratio} | "
                  f"{r['seconds']} |")


if __name__ == "__main__":
    main()
