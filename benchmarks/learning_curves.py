"""Validation bits per byte vs step: the Reformer against full attention.

On the default corpus (the Python standard library's sources,
`keras_reformer.data.default_corpus_files`), the same-size models trained
for the same steps on the same batches:

- `lsh2` (the reference Reformer: 2 hash rounds), `lsh1`, `lsh4`;
- `lsh2_plain`: `reversible=False` (ordinary residual stack, autodiff);
- `lsh2_shift`: lsh2 with `value_shift=True` (keys bring the value of the
  next position, queries see strictly earlier keys); `lsh1_shift`,
  `lsh4_shift` and `lsh2_shift_plain` (`reversible=False`) likewise;
- `lsh1_wide`: the Reformer with 1 round and 2 buckets of `length / 2`:
  every chunk's window covers the whole sequence, so the one restriction
  left is the bucket (the causal rule of `LSHAttention`: a query sees the
  earlier positions hashed to its own bucket, about half of them). Against
  `lsh2`: what narrow windows and many buckets cost;
- `mha_shared`: `mha` with the Reformer's attention rule computed densely
  (`dense_attention` below: keys are the unit-length queries, a token
  attends to itself only when nothing else is allowed), everything else as
  `mha`. It separates shared QK from the rest of the Reformer (positions,
  reversible blocks);
- `mha_shared_shift`: `mha_shared` where the key at position j brings the
  value of position j + 1, and only keys j < i count (position 0 outputs
  zeros). A symmetric score can match the current token with an earlier
  occurrence of the same token; the shift then copies what followed it,
  the lookup that shared QK cannot express directly (a score q_i . k_j that
  matches "token at i" with "token before j" also matches "token before i"
  with "token at j");
- `mha_shift`: `mha` (separate query and key projections, computed
  densely) with the shift of `mha_shared_shift`: full attention given the
  same help as `lsh2_shift`;
- `mha_shared_rev`: `mha_shared` with the Reformer's two-stream wiring
  (x1 += attention(x2); x2 += ffn(x1); the two streams concatenated);
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
    python benchmarks/learning_curves.py --merge learning_curves_conv.csv \
        learning_curves_mha_shared.csv --csv learning_curves_ablation.csv
                                          # one figure from earlier runs' CSVs

`--short-convolution W` adds a causal convolution of width W over the
embeddings to every model (ReformerBackbone's `short_convolution`; the same
`ShortConvolution` layer in `mha`). `--hidden-dim` sets d_model (FFN
4 x d_model, 4 heads).
`--num-buckets N` gives the `lsh` kinds N buckets per round instead of
ReformerBackbone's rule (2 x length / 64); the bucket size (64, the chunk of
the windows) stays, so a causal query still sees up to 64 earlier keys of
its own bucket: fewer buckets make a target more likely to share the
query's bucket and shorten how far back those 64 keys reach.

Writes benchmarks/results/learning_curves.csv and docs/learning_curves.png;
`--table CSV...` prints result CSVs as docs/learning.md's table.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

KINDS = ("lsh2", "lsh1", "lsh4", "lsh2_plain", "lsh2_shift", "lsh1_shift", "lsh4_shift",
         "lsh2_shift_plain", "lsh1_wide", "mha_shared", "mha_shared_shift",
         "mha_shared_rev", "mha_shift", "mha")
LAYERS, HEADS = 2, 4


def dense_attention(d_model, shared=True, shift=False):
    """Dense causal attention: with `shared`, shared QK, the Reformer's rule
    without hashing; else separate query and key projections, as
    MultiHeadAttention (`shift`: key j brings value j + 1, keys j < i only)."""
    import keras
    from keras import ops

    class DenseAttention(keras.layers.Layer):
        def build(self, shape):
            # Biases where MultiHeadAttention has them.
            head = (None, HEADS, d_model // HEADS)
            self.qk = keras.layers.EinsumDense("btd,dhk->bthk", head, bias_axes="hk")
            self.v = keras.layers.EinsumDense("btd,dhk->bthk", head, bias_axes="hk")
            self.k = None if shared else keras.layers.EinsumDense(
                "btd,dhk->bthk", head, bias_axes="hk")
            self.out = keras.layers.EinsumDense("bthk,hkd->btd", (None, d_model),
                                                bias_axes="d")
            for layer, shape_in in ((self.qk, shape), (self.v, shape), (self.k, shape),
                                    (self.out, (None, None, HEADS, d_model // HEADS))):
                if layer is not None:
                    layer.build(shape_in)

        def call(self, x):
            q = self.qk(x)
            if shared:
                k = q / ops.sqrt(ops.sum(q * q, -1, keepdims=True) + 1e-6)
            else:
                k = self.k(x)
            logits = ops.einsum("bqhk,bshk->bhqs", q, k) / (d_model // HEADS) ** 0.5
            n = ops.shape(x)[1]
            rows, cols = ops.arange(n)[:, None], ops.arange(n)[None, :]
            # -1e9 on the future; with shared QK -1e5 on itself (position 0
            # keeps only itself).
            if shift:
                bias = ops.where(cols >= rows, -1e9, 0.0)
            elif not shared:
                bias = ops.where(cols > rows, -1e9, 0.0)
            else:
                bias = ops.where(cols > rows, -1e9, ops.where(cols == rows, -1e5, 0.0))
            weights = ops.softmax(logits + ops.cast(bias, logits.dtype), axis=-1)
            v = self.v(x)
            if shift:
                v = ops.concatenate([v[:, 1:], ops.zeros_like(v[:, :1])], axis=1)
                # Row 0 has no key j < 0: its uniform weights would read the
                # future, so its output is zeroed.
                weights = weights * ops.cast(rows > 0, weights.dtype)[None, None]
            return self.out(ops.einsum("bhqs,bshk->bqhk", weights, v))

    return DenseAttention()


def build(kind, length, width, hidden, buckets=0, seed=0, chunks_before=1):
    import keras

    import keras_reformer as kr

    d_model, ffn = hidden, 4 * hidden
    if kind.startswith("mha"):
        tokens = keras.Input((length,), dtype="int32")
        x = keras.layers.Embedding(256, d_model)(tokens)
        x = x + keras.layers.Embedding(length, d_model)(keras.ops.arange(length))[None]
        if width:
            x = x + kr.layers.ShortConvolution(width)(x)
        def attention(y):
            if kind.startswith("mha_shared"):
                return dense_attention(d_model, shared=True, shift="shift" in kind)(y)
            if kind == "mha_shift":
                return dense_attention(d_model, shared=False, shift=True)(y)
            return keras.layers.MultiHeadAttention(HEADS, d_model // HEADS)(
                y, y, use_causal_mask=True)

        def feed_forward(y):
            y = keras.layers.Dense(ffn, activation="gelu")(y)
            return keras.layers.Dense(d_model)(y)

        def norm(y):
            return keras.layers.LayerNormalization()(y)

        if kind.endswith("_rev"):
            # The Reformer's two-stream wiring: the attention of a layer
            # sees x2, which holds the FFN outputs but not the attention's.
            x1 = x2 = x
            for _ in range(LAYERS):
                x1 = x1 + attention(norm(x2))
                x2 = x2 + feed_forward(norm(x1))
            x = keras.layers.Concatenate()([x1, x2])
        else:
            for _ in range(LAYERS):
                x = x + attention(norm(x))
                x = x + feed_forward(norm(x))
        return keras.Model(tokens, keras.layers.Dense(256)(norm(x)))
    # lsh1_wide: 2 chunks, and each chunk's window is itself + the other.
    wide = kind == "lsh1_wide"
    backbone = kr.models.ReformerBackbone(
        256, num_layers=LAYERS, hidden_dim=d_model, num_heads=HEADS,
        intermediate_dim=ffn, num_hashes=int(kind[3]),
        bucket_size=length // 2 if wide else 64, num_buckets=2 if wide else (buckets or None),
        max_sequence_length=length,
        reversible=not kind.endswith("_plain"), seed=seed,
        num_chunks_before=chunks_before,
        short_convolution=width or None, value_shift="_shift" in kind,
    )
    # The LM (logits) behind a wrapper taking the token ids alone: the
    # training windows are never padded.
    lm = kr.models.ReformerCausalLM(backbone)
    tokens = keras.Input((length,), dtype="int32")
    return keras.Model(tokens, lm(
        {"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}))


def point(kind, length, batch, steps, evals, val_batches, learning_rate, width, hidden,
          buckets=0, seed=0, chunks_before=1, *eval_hashes):
    import keras

    import keras_reformer as kr
    from keras_reformer import data

    # One seed sets the initial weights, the hashing and dropout seeds and
    # the order of the training batches (every kind of a run sees the same).
    keras.utils.set_random_seed(seed)
    train_files, val_files = data.split_files(data.default_corpus_files())
    train = data.lm_dataset(train_files, length, batch, seed=seed,
                            with_padding_mask=False)
    val = data.lm_dataset(val_files, length, batch, shuffle=False,
                          with_padding_mask=False).take(val_batches).cache()
    model = build(kind, length, width, hidden, buckets, seed, chunks_before)
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
    # The trained weights evaluated with other hash rounds (the paper's
    # Table 2 does this): the same validation batches, retraced.
    by_rounds = {}
    if kind.startswith("lsh"):
        backbone = next(layer for layer in model.layers
                        if isinstance(layer, kr.models.ReformerCausalLM)).backbone
        for rounds in eval_hashes:
            backbone.set_num_hashes(rounds)
            model.test_function = None
            loss = model.evaluate(val, steps=val_batches, verbose=0)
            by_rounds[rounds] = round(loss / math.log(2), 4)
    _common.emit({
        "kind": kind, "length": length, "batch": batch, "steps": steps,
        "short_convolution": width, "hidden_dim": hidden,
        "num_buckets": buckets if kind.startswith("lsh") and kind != "lsh1_wide" else "",
        "chunks_before": chunks_before if kind.startswith("lsh") else "",
        "seed": seed, "params": model.count_params(), "seconds": round(time.time() - start),
        "val_bits": [round(v / math.log(2), 4) for v in nats],
        "train_bits": [round(v / math.log(2), 4) for v in history.history["loss"]],
        "eval_hashes_bits": " ".join(f"{r}:{b}" for r, b in by_rounds.items()),
    })


def label(row):
    """The kind, with its bucket count where it was not the default rule."""
    buckets = str(row.get("num_buckets") or "")
    name = f"{row['kind']} ({buckets} buckets)" if buckets not in ("", "0") else row["kind"]
    reach = str(row.get("chunks_before") or "")
    return name if reach in ("", "1") else f"{name}, {reach} chunks back"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        evals = len(row["val_bits"])
        steps = [row["steps"] // evals * (i + 1) for i in range(evals)]
        ax.plot(steps, row["val_bits"], marker="o", label=label(row))
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
    parser.add_argument("--num-buckets", type=int, default=0,
                        help="buckets per round of the lsh kinds (0: ReformerBackbone's "
                             "rule, 2 x length / 64)")
    parser.add_argument("--chunks-before", type=int, default=1,
                        help="num_chunks_before of the lsh kinds (a causal query sees "
                             "this many x 64 recent keys of its bucket per round)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, hashing/dropout seeds and batch order")
    parser.add_argument("--eval-hashes", type=int, nargs="+", default=[], metavar="N",
                        help="after training, evaluate the lsh kinds' final weights "
                             "with N hash rounds too (column eval_hashes_bits)")
    parser.add_argument("--csv", default="learning_curves.csv")
    parser.add_argument("--merge", nargs="+", metavar="CSV",
                        help="only plot these earlier result CSVs (benchmarks/results/) "
                             "into one figure, docs/<--csv name>.png, and print their table")
    parser.add_argument("--table", nargs="+", metavar="CSV",
                        help="print these result CSVs as docs/learning.md's table and exit")
    parser.add_argument("--point", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table([row for name in args.table for row in _common.read_csv(name)]))
        return
    if args.merge:
        return report(merged_rows(args.merge), args.csv)
    if args.point:
        kind, *numbers = args.point
        length, batch, steps, evals, val_batches = map(int, numbers[:5])
        return point(kind, length, batch, steps, evals, val_batches, float(numbers[5]),
                     *map(int, numbers[6:]))
    if args.num_buckets < 0 or args.num_buckets % 2:
        parser.error(f"--num-buckets must be 0 (the default rule) or a positive even "
                     f"number. Received: {args.num_buckets}")
    if args.short_convolution < 0:
        parser.error(f"--short-convolution must be >= 0. Received: {args.short_convolution}")
    if args.chunks_before < 1:
        parser.error(f"--chunks-before must be >= 1. Received: {args.chunks_before}")
    if any(n < 1 for n in args.eval_hashes):
        parser.error(f"--eval-hashes must be >= 1. Received: {args.eval_hashes}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0. Received: {args.seed}")
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
            args.hidden_dim, args.num_buckets, args.seed, args.chunks_before,
            *args.eval_hashes],
            timeout=6 * 3600)
        _common.progress(f"  {record}")
        if record.get("status") == "ok":
            rows.append(record)
    path = _common.write_csv(args.csv, [
        dict(r, val_bits=" ".join(map(str, r["val_bits"])),
             train_bits=" ".join(map(str, r["train_bits"]))) for r in rows])
    print(f"wrote {path}")
    report(rows, args.csv)


def merged_rows(names):
    import csv

    rows = []
    for name in names:
        with open(os.path.join(_common.RESULTS, name), newline="") as f:
            for row in csv.DictReader(f):
                row.update(steps=int(row["steps"]), length=int(row["length"]),
                           batch=int(row["batch"]),
                           val_bits=[float(v) for v in row["val_bits"].split()])
                rows.append(row)
    return rows


def table(rows):
    """Rows of result CSVs (strings, as read back) as docs/learning.md's
    table: bits per byte at each evaluation and the last one against full
    attention with and without the value shift."""
    last = {r["kind"]: float(r["val_bits"].split()[-1]) for r in rows}
    steps = int(rows[0]["steps"])
    evals = len(rows[0]["val_bits"].split())
    at = " / ".join(f"{steps // evals * (i + 1):,}" for i in range(evals))
    lines = [f"| model | validation bits per byte after {at} steps | vs mha | vs mha_shift "
             f"| training seconds |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        bits = " / ".join(f"{float(v):.3f}" for v in r["val_bits"].split())
        ratios = [f"{last[r['kind']] / last[ref]:.3f}x" if ref in last else "-"
                  for ref in ("mha", "mha_shift")]
        lines.append(f"| {label(r)} | {bits} | {ratios[0]} | {ratios[1]} | {r['seconds']} |")
    return "\n".join(lines)


def report(rows, csv_name):
    if rows:
        plot(rows, os.path.join(_common.DOCS, os.path.splitext(csv_name)[0] + ".png"))
        print("| model | val bits per byte at each eval | vs mha (last) | seconds |")
        print("|---|---|---|---|")
        ref = next((r["val_bits"][-1] for r in rows if r["kind"] == "mha"), None)
        for r in rows:
            ratio = f"{r['val_bits'][-1] / ref:.3f}x" if ref else "-"
            print(f"| {label(r)} | {', '.join(map(str, r['val_bits']))} | {ratio} | "
                  f"{r['seconds']} |")


if __name__ == "__main__":
    main()
