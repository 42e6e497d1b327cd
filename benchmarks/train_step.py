"""Tokens/s, peak RSS and FLOP utilisation (MFU, HFU) of a full training step.

Reference configuration: causal ReformerCausalLM (a
ReformerBackbone and its LM head), 2 layers, d_model 256, 4 heads x 64, FFN
1024, bucket 64, 2 hashes, vocabulary 256, batch 1, Adam. Baseline: the
same model built from `keras.layers.MultiHeadAttention` with ordinary
residual blocks (no reversible stack, unchunked FFN).

Each point is a fresh process: build, compile (`jit_compile` on or off),
two warm-up steps, then the best of `--steps` timed `train_on_batch` calls.
The first point of every run measures this machine's fp32 matmul rate
(also in a fresh process), and utilisation comes in two kinds:

    MFU = model FLOPs per token * tokens/s / matmul rate
    HFU = hardware FLOPs per token * tokens/s / matmul rate

Model FLOPs are what the model needs, whoever runs it: forward + backward
(3x the forward's matmuls: projections, chunk attention, FFN, head) plus
the hashing's forward (argmax passes no gradient). Hardware FLOPs are what
this implementation computes: also the reversible stack's recomputation of
each block's forward, and the chunked FFN's and the looped chunk
attention's own recomputations in their backward passes.

--peer runs the PyTorch Reformer (HF transformers, benchmarks/peers; set up
with `bash benchmarks/peers/setup.sh`) in the same configuration, alternating
fresh processes (ours, peer, ours, peer, ...) `--repeats` times per length,
and reports the median (min, max) of each and the ratio ours / peer of the
medians. Only ratios from one such run count: the machines are shared.

    python benchmarks/train_step.py                       # 1K..128K, CSV + plot
    python benchmarks/train_step.py --lengths 4096 --models reformer
    python benchmarks/train_step.py --lengths 4096 131072 --models reformer \
        --jit on --repeats 3      # 3 rounds, each length against 4K's in its round
    python benchmarks/train_step.py --peer --lengths 1024 4096 16384 65536
    python benchmarks/train_step.py --table train_step_peer_modes2.csv  # docs' table
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIG = dict(vocabulary_size=256, num_layers=2, hidden_dim=256, num_heads=4,
              key_dim=64, intermediate_dim=1024, bucket_size=64, num_hashes=2)


def num_buckets(length, bucket_size=64, factorize_above=256):
    """Bucket count of LSHAttention's derived rule, as (per-hash sizes)."""
    import math

    n = max(2, 2 * math.ceil(length / bucket_size))
    if n <= factorize_above:
        return (n,)
    first = 2 * math.ceil(math.sqrt(n) / 2)
    return (first, 2 * math.ceil(n / first / 2))


def axial_shape(length):
    """Our default axial (l1, l2): l1 the power of two at or below sqrt(length)."""
    first = 1
    while (first * 2) ** 2 <= length:
        first *= 2
    return first, -(-length // first)


def _group_elements():
    from keras_reformer.lsh.chunk_attention import GROUP_ELEMENTS

    return GROUP_ELEMENTS


def _per_token_parts(length):
    """Forward FLOPs per token and layer (2 per multiply-add), by part."""
    d, h, k = CONFIG["hidden_dim"], CONFIG["num_heads"], CONFIG["key_dim"]
    ff, c, r = CONFIG["intermediate_dim"], CONFIG["bucket_size"], CONFIG["num_hashes"]
    window = 2 * c  # one chunk back
    return dict(
        projections=2 * d * h * k * 3,  # shared qk, v, output
        hashing=2 * h * r * k * sum(n // 2 for n in num_buckets(length, c)),
        attention=2 * 2 * h * r * k * window,  # scores and weighted sum
        ffn=2 * 2 * d * ff,
        head=2 * 2 * d * CONFIG["vocabulary_size"],  # both streams (2d) -> vocab
        # Above GROUP_ELEMENTS logits (batch 1) our chunk attention loops
        # over (batch, head) groups and recomputes each group in its backward.
        looped=length * window * h * r > _group_elements(),
    )


def model_flops_per_token(model, length):
    """FLOPs per token the model itself needs for one training step: 3x the
    forward's matmuls (forward + 2x backward), the hashing once (no
    gradient flows through argmax), no recomputation. The same for any
    implementation of the model, so the peer is counted by it too."""
    if model == "mha":
        return hardware_flops_per_token(model, length)  # nothing recomputed
    p = _per_token_parts(length)
    block = 3 * (p["projections"] + p["attention"] + p["ffn"]) + p["hashing"]
    return CONFIG["num_layers"] * block + 3 * p["head"]


def hardware_flops_per_token(model, length):
    """FLOPs per token that the implementation actually computes."""
    layers = CONFIG["num_layers"]
    if model == "mha":
        d, h, k = CONFIG["hidden_dim"], CONFIG["num_heads"], CONFIG["key_dim"]
        projections = 2 * d * h * k * 4
        # Causal masking does not skip work: all L keys are scored.
        attention = 2 * 2 * h * k * length
        block = projections + attention + 2 * 2 * d * CONFIG["intermediate_dim"]
        head = 2 * d * CONFIG["vocabulary_size"]
        return layers * block * 3 + head * 3  # forward + 2x backward
    p = _per_token_parts(length)
    core = p["projections"] + p["attention"] + p["ffn"]
    if model == "hf_reformer":
        # HF's reversible backward recomputes each block once, reusing the
        # forward's buckets (no re-hash); its FFN is unchunked
        # (chunk_size_feed_forward=0) and its attention is not looped.
        block = 4 * core + p["hashing"]
    else:
        # Forward + the reversible stack's recomputation (which re-hashes
        # from the replayed seed) + 2x backward. The FFN's recomputation and
        # its slice-wise backward are one pass (ops.sequence_slices.chunked_value_and_vjp),
        # so the FFN is not computed a third time.
        block = 4 * core + 2 * p["hashing"]
        if p["looped"]:
            block += p["attention"]
    return layers * block + 3 * p["head"]


def add_utilisation(row, gflops):
    """MFU and HFU columns of a measured row, from the run's matmul rate."""
    if row.get("status") != "ok" or not gflops:
        return row
    model, length = row["model"], row["length"]
    rate = row["tokens_per_s"] / (gflops * 1e9)
    row["matmul_gflops"] = gflops
    row["model_flops_per_token"] = round(model_flops_per_token(model, length))
    row["hardware_flops_per_token"] = round(hardware_flops_per_token(model, length))
    row["mfu"] = round(row["model_flops_per_token"] * rate, 3)
    row["hfu"] = round(row["hardware_flops_per_token"] * rate, 3)
    return row


def build(model, length, jit, config=None):
    """The reference model (`config`, default CONFIG), compiled with Adam;
    layers take Keras' global dtype policy (e.g. "mixed_bfloat16")."""
    import keras

    import keras_reformer as kr

    config = config or CONFIG
    keras.utils.set_random_seed(0)
    if model == "reformer":
        net = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
            **config, max_sequence_length=length, causal=True, dropout=0.0,
            attention_dropout=0.0, seed=0,
        ))
    else:
        d = config["hidden_dim"]
        tokens = keras.Input((length,), dtype="int32")
        # (No position embedding: its cost is negligible either way.)
        x = keras.layers.Embedding(config["vocabulary_size"], d)(tokens)
        for _ in range(config["num_layers"]):
            y = keras.layers.LayerNormalization()(x)
            y = keras.layers.MultiHeadAttention(config["num_heads"], config["key_dim"])(
                y, y, use_causal_mask=True
            )
            x = x + y
            y = keras.layers.LayerNormalization()(x)
            y = keras.layers.Dense(config["intermediate_dim"], activation="gelu")(y)
            x = x + keras.layers.Dense(d)(y)
        x = keras.layers.LayerNormalization()(x)
        net = keras.Model(tokens, keras.layers.Dense(config["vocabulary_size"])(x))
    # No metrics, for either model (a ReformerCausalLM comes compiled with a
    # weighted accuracy, which `weighted_metrics=None` would keep).
    net.compile(
        keras.optimizers.Adam(1e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[], jit_compile=jit,
    )
    return net


def batch(model, length):
    """One batch (batch size 1) of random bytes and their next bytes: the
    inputs `model` ("reformer": a keras-hub dict; "mha": the ids) and the
    labels."""
    import numpy as np

    x = np.random.default_rng(0).integers(1, 256, size=(1, length)).astype("int32")
    y = np.roll(x, -1, axis=1)
    if model == "reformer":
        x = {"token_ids": x, "padding_mask": np.ones_like(x)}
    return x, y


def best_step(net, x, y, steps):
    """Two warm-up `train_on_batch` calls (the first compiles), then the
    best of `steps` timed ones, in seconds."""
    for _ in range(2):
        net.train_on_batch(x, y)
    return _common.best_time(lambda: net.train_on_batch(x, y), steps)


def point(model, length, jit, steps):
    # The runtime's floor: RSS once TensorFlow, Keras, keras-hub and the
    # library are imported, before any model (the peer measures its own
    # after importing torch and transformers): peak minus floor is what the
    # model and its training cost, whichever runtime holds them.
    import keras_reformer.models  # noqa: F401

    floor = _common.current_rss_mb()
    net = build(model, length, jit)
    x, y = batch(model, length)
    base = _common.current_rss_mb()
    seconds = best_step(net, x, y, steps)
    peak = _common.peak_rss_mb()
    _common.emit({
        "model": model, "length": length, "jit": jit,
        "step_s": round(seconds, 4), "tokens_per_s": round(length / seconds),
        "peak_rss_mb": round(peak), "step_mem_mb": round(peak - base),
        "import_rss_mb": round(floor), "above_import_mb": round(peak - floor),
        # XLA's own options change its memory and speed (the fusion
        # emitters, for one): a row records those it ran with.
        "xla_flags": os.environ.get("XLA_FLAGS", "") if jit else "",
        # Whether the first call returned the compiler's freed memory
        # (keras_reformer.memory; off with KERAS_REFORMER_KEEP_FREED_MEMORY=1).
        "freed_memory": "returned" if model == "reformer"
        and keras_reformer.memory.models_return_freed_memory() else "kept",
    })


def matmul_point():
    """Best fp32 GFLOP/s of large and model-shaped matmuls on this machine."""
    import tensorflow as tf

    best = 0.0
    for m, kdim, n in ((2048, 2048, 2048), (8192, 256, 1024), (8192, 1024, 256)):
        a = tf.random.normal((m, kdim))
        b = tf.random.normal((kdim, n))
        fn = tf.function(lambda a, b: tf.matmul(a, b))
        fn(a, b).numpy()
        for _ in range(10):
            start = time.perf_counter()
            fn(a, b).numpy()
            best = max(best, 2 * m * kdim * n / (time.perf_counter() - start) / 1e9)
    _common.emit({"matmul_gflops": round(best, 1)})


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in ("reformer", "mha"):
        for jit in (False, True):
            ok = [r for r in rows if r.get("model") == model and r.get("jit") == jit
                  and r["status"] == "ok"]
            if not ok:
                continue
            label = f"{model}{' + XLA' if jit else ''}"
            # One line per round (`--repeats`), in one colour: a single line
            # through all rounds would run back from the longest length.
            rounds = sorted({r.get("round", 1) for r in ok})
            for k, round_ in enumerate(rounds):
                mine = [r for r in ok if r.get("round", 1) == round_]
                xs = [r["length"] for r in mine]
                for ax, key in zip(axes, ("tokens_per_s", "peak_rss_mb")):
                    ax.plot(xs, [r[key] for r in mine], "o-", label=label if k == 0 else None,
                            color=f"C{2 * (model == 'mha') + jit}")
    _common.finish_length_figure(
        fig, axes, ("tokens / s (training step)", "peak RSS (MiB)"),
        "2-layer model, d 256, 4x64 heads, FFN 1024, batch 1, Adam", path)


def spread(values):
    """(median, min, max) of a list of numbers."""
    import statistics

    return statistics.median(values), min(values), max(values)


def peer_sweep(args, gflops):
    """Ours and the peer as alternating fresh processes, `--repeats` pairs per
    length: alternation spreads the machine's drift over both sides."""
    runs = []
    for length in args.lengths:
        for repeat in range(args.repeats):
            for jit in args.jit:
                row = {"model": "reformer", "length": length, "jit": jit == "on"}
                row.update(_common.run_point(
                    __file__, ["reformer", length, jit, args.steps], timeout=3600))
                runs.append(row)
                _common.progress(f"[{repeat + 1}/{args.repeats}] {row}")
            row = {"model": "hf_reformer", "length": length, "jit": False}
            row.update(_common.run_peer(
                "hf_train_step.py", ["--length", length, "--steps", args.steps]))
            runs.append(row)
            _common.progress(f"[{repeat + 1}/{args.repeats}] {row}")
    rows = []
    for length in args.lengths:
        for model, jit in [("reformer", j == "on") for j in args.jit] + [("hf_reformer", False)]:
            mine = [r for r in runs if (r["model"], r["length"], r["jit"]) == (model, length, jit)]
            ok = [r for r in mine if r.get("status") == "ok"]
            row = {"model": model, "length": length, "jit": jit, "runs": len(mine),
                   "ok_runs": len(ok)}
            if ok:
                tps = spread([r["tokens_per_s"] for r in ok])
                rss = spread([r["peak_rss_mb"] for r in ok])
                row.update(tokens_per_s=tps[0], tokens_per_s_min=tps[1],
                           tokens_per_s_max=tps[2], peak_rss_mb=rss[0],
                           peak_rss_mb_min=rss[1], peak_rss_mb_max=rss[2],
                           status="ok")
                if all("above_import_mb" in r for r in ok):
                    row.update(import_rss_mb=spread([r["import_rss_mb"] for r in ok])[0],
                               above_import_mb=spread([r["above_import_mb"] for r in ok])[0])
                for key in ("torch", "transformers"):
                    if key in ok[0]:
                        row[key] = ok[0][key]
                add_utilisation(row, gflops)
            else:
                row["status"] = mine[-1].get("status", "not run") if mine else "not run"
            rows.append(row)
    peers = {r["length"]: r for r in rows if r["model"] == "hf_reformer"}
    for row in rows:
        peer = peers[row["length"]]
        if row["model"] == "reformer" and row["status"] == peer["status"] == "ok":
            row["tokens_per_s_ratio"] = round(row["tokens_per_s"] / peer["tokens_per_s"], 3)
            row["peak_rss_ratio"] = round(row["peak_rss_mb"] / peer["peak_rss_mb"], 3)
            if "above_import_mb" in row and "above_import_mb" in peer:
                row["above_import_ratio"] = round(
                    row["above_import_mb"] / peer["above_import_mb"], 3)
    return rows


def plot_peer(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, jit, label in (("reformer", False, "keras-reformer"),
                              ("reformer", True, "keras-reformer + XLA"),
                              ("hf_reformer", False, "HF transformers (PyTorch)")):
        ok = [r for r in rows if (r["model"], r["jit"]) == (model, jit) and r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["length"] for r in ok]
        for ax, key in zip(axes, ("tokens_per_s", "peak_rss_mb")):
            mid = [r[key] for r in ok]
            err = [[m - r[key + "_min"] for m, r in zip(mid, ok)],
                   [r[key + "_max"] - m for m, r in zip(mid, ok)]]
            ax.errorbar(xs, mid, yerr=err, fmt="o-", capsize=3, label=label)
    titles = ("tokens / s (median, min-max)", "peak RSS MiB (median, min-max)")
    _common.finish_length_figure(
        fig, axes, titles, "Training step, alternating processes, same machine and run", path)


def report_peer(rows, gflops, path):
    print(f"wrote {path}; matmul rate {gflops} GFLOP/s; medians (min-max) over runs")
    print("| length | impl | tokens/s | ours/peer | peak RSS MiB | ours/peer | MFU | HFU | runs ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "peer (HF)" if r["model"] == "hf_reformer" else (
            "ours + XLA" if r["jit"] else "ours")
        if r["status"] != "ok":
            print(f"| {r['length']} | {name} | {r['status']} | | | | | | 0/{r['runs']} |")
            continue
        print(f"| {r['length']} | {name} | {r['tokens_per_s']:.0f} "
              f"({r['tokens_per_s_min']}-{r['tokens_per_s_max']}) "
              f"| {r.get('tokens_per_s_ratio', '')} | {r['peak_rss_mb']:.0f} "
              f"({r['peak_rss_mb_min']}-{r['peak_rss_mb_max']}) | {r.get('peak_rss_ratio', '')} "
              f"| {r.get('mfu', '')} | {r.get('hfu', '')} | {r['ok_runs']}/{r['runs']} |")


def _k(value):
    """A number as the docs print it: thousands separated, no decimals."""
    return f"{float(value):,.0f}"


def peer_table(rows):
    """Rows of --peer CSVs (strings, as read back) as docs/benchmarks.md's
    table: per length, tokens/s and peak RSS of ours in graph mode, ours
    under XLA and the peer, and the ratios ours / peer."""
    by = {(int(r["length"]), r["model"], r["jit"] == "True"): r
          for r in rows if r["status"] == "ok"}
    lines = ["| length | tokens/s: ours graph / ours XLA / peer | graph / peer | XLA / peer "
             "| peak RSS MiB: ours graph / ours XLA / peer | RSS graph / peer | RSS XLA / peer |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for length in sorted({key[0] for key in by}):
        graph, xla = by.get((length, "reformer", False)), by.get((length, "reformer", True))
        peer = by.get((length, "hf_reformer", False))
        if not (graph and xla and peer):
            continue
        tps = " / ".join(_k(r["tokens_per_s"]) for r in (graph, xla, peer))
        rss = " / ".join(_k(r["peak_rss_mb"]) for r in (graph, xla, peer))
        lines.append(
            f"| {length // 1024}K | {tps} | {float(graph['tokens_per_s_ratio']):.2f}x "
            f"| {float(xla['tokens_per_s_ratio']):.2f}x | {rss} "
            f"| {float(graph['peak_rss_ratio']):.2f}x | {float(xla['peak_rss_ratio']):.2f}x |")
    return "\n".join(lines)


def sweep_round(args, gflops, repeat):
    """One round of the plain sweep: every length, model and mode in turn,
    each a fresh process. With `--repeats` above 1 the rows carry their
    `round` and `vs_shortest`: tokens/s over that of the round's shortest
    length for the same model and mode, a ratio of two processes run
    minutes apart rather than across the whole run."""
    rows = []
    for length in args.lengths:
        for model in args.models:
            for jit in args.jit:
                row = {"model": model, "length": length, "jit": jit == "on"}
                if args.repeats > 1:
                    row["round"] = repeat + 1
                if model == "mha" and length > args.mha_max_length:
                    row["status"] = "not run: O(L^2) attention does not fit"
                else:
                    row.update(_common.run_point(
                        __file__, [model, length, jit, args.steps], timeout=3600))
                rows.append(add_utilisation(row, gflops))
                _common.progress(f"{row}")
    if args.repeats > 1:
        shortest = min(args.lengths)
        first = {(r["model"], r["jit"]): r.get("tokens_per_s")
                 for r in rows if r["length"] == shortest}
        for row in rows:
            base = first.get((row["model"], row["jit"]))
            if row.get("tokens_per_s") and base:
                row["vs_shortest"] = round(row["tokens_per_s"] / base, 3)
    return rows


def check_args(parser, args):
    if args.repeats is None:
        args.repeats = 5 if args.peer else 1
    if any(n < 1 for n in args.lengths) or args.steps < 1 or args.repeats < 1:
        parser.error("--lengths, --steps and --repeats must be positive")
    if args.jit is None:
        args.jit = ["off"] if args.peer else ["off", "on"]
    if not args.peer:
        return
    _common.require_peer(parser)
    c = CONFIG["bucket_size"]
    bad = [n for n in args.lengths if n % c or axial_shape(n)[0] * axial_shape(n)[1] != n]
    if bad:
        parser.error(f"--peer lengths must be multiples of {c} that the axial "
                     f"shape factors exactly (HF trains on no others), e.g. 1024 "
                     f"4096 16384 65536; got {bad}")


def figure_path(args, csv_path, name):
    """docs/<name>, or beside the CSV for a run with its own --csv (a smoke
    run must not overwrite the documented figure)."""
    if args.csv:
        return os.path.splitext(csv_path)[0] + ".png"
    return os.path.join(_common.DOCS, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", nargs="+")
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 4096, 16384, 65536, 131072])
    parser.add_argument("--models", nargs="+", default=["reformer", "mha"],
                        choices=["reformer", "mha"])
    parser.add_argument("--jit", nargs="+", choices=["off", "on"],
                        help="default: off and on; with --peer, off (graph mode)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mha-max-length", type=int, default=8192,
                        help="longer MHA points would need > 20 GB and are not run")
    parser.add_argument("--peer", action="store_true",
                        help="ours vs the PyTorch Reformer (benchmarks/peers), "
                             "alternating processes; ignores --models")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of fresh processes: with --peer, process "
                             "pairs per length (default 5); else rounds of the "
                             "whole sweep (default 1)")
    parser.add_argument("--csv", help="default train_step.csv (train_step_peer.csv with --peer)")
    parser.add_argument("--table", nargs="+", metavar="CSV",
                        help="print these --peer CSVs (benchmarks/results/) as "
                             "docs/benchmarks.md's table and exit")
    args = parser.parse_args()
    if args.table:
        print(peer_table([row for name in args.table for row in _common.read_csv(name)]))
        return
    if args.point:
        if args.point[0] == "matmul":
            return matmul_point()
        model, length, jit, steps = args.point
        return point(model, int(length), jit == "on", int(steps))
    check_args(parser, args)

    rate = _common.run_point(__file__, ["matmul"])
    _common.progress(f"matmul: {rate}")
    gflops = rate.get("matmul_gflops")
    if args.peer:
        rows = peer_sweep(args, gflops)
        path = _common.write_csv(args.csv or "train_step_peer.csv", rows)
        plot_peer(rows, figure_path(args, path, "train_step_peer.png"))
        return report_peer(rows, gflops, path)
    rows = []
    for repeat in range(args.repeats):
        rows += sweep_round(args, gflops, repeat)
    path = _common.write_csv(args.csv or "train_step.csv", rows)
    if len(rows) > 1:  # (a single point, as the 128K row, draws nothing)
        plot(rows, figure_path(args, path, "train_step_benchmark.png"))
    print(f"wrote {path}; matmul rate {gflops} GFLOP/s")
    print("| model | length | XLA | tokens/s | MFU | HFU | peak RSS MiB | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['length']} | {r['jit']} | {r.get('tokens_per_s', '')} "
              f"| {r.get('mfu', '')} | {r.get('hfu', '')} | {r.get('peak_rss_mb', '')} "
              f"| {r['status']} |")


if __name__ == "__main__":
    main()
