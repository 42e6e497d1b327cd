"""What `quantize(mode)` does to a ReformerCausalLM: weight memory, inference
speed, and how far the outputs move (against Keras' own layers).

Two parts, each point in a fresh process:

- size and speed: the reference language model (2 layers, d_model 256, 4
  heads, FFN 1024, bucket 64, byte vocabulary 258) in both weight layouts,
  float32 and quantized with each mode. Per point: the bytes of the model's
  variables, the process's RSS after a warm-up, and the median time of a
  forward pass (`predict_on_batch`, graph mode) over 1 x `--length` tokens
  and of a 64-token keras-hub `generate()` after a 64-token prompt.
- output change: max |quantized - float| over a batch, as a fraction of the
  float outputs' range, for the same models as the tests
  (tests/models/test_quantization.py): a 2-layer Reformer whose attention
  is exact (one chunk covers the input, so no hashing) and a same-size model
  of Keras' MultiHeadAttention and Dense layers; and the hashed (causal LSH)
  Reformer, whose buckets may move under any small change of its inputs.

    python benchmarks/quantization.py            # writes benchmarks/results/quantization.csv
    python benchmarks/quantization.py --length 256 --repeats 2   # quicker
    python benchmarks/quantization.py --table    # the CSV as docs/generation.md's tables
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODES = ["float32", "int8", "int4", "float8"]
SHAPE = dict(vocabulary_size=258, num_layers=2, hidden_dim=256, num_heads=4,
             bucket_size=64, num_hashes=2, max_sequence_length=4096, seed=0)


def size_and_speed(mode, layout, length, repeats):
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")  # Keras warns once per layer it cannot quantize
    import keras_reformer as kr

    lm = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
        **SHAPE, stack_weights=(layout == "stacked")))
    if mode != "float32":
        lm.quantize(mode)
    lm.compile(sampler="greedy")
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                       for v in lm.variables)
    ids = np.random.default_rng(0).integers(0, 258, (1, length)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    prompt = {"token_ids": np.pad(ids[:, :64], [[0, 0], [0, 64]]),
              "padding_mask": (np.arange(128) < 64)[None].astype("int32")}

    def timed(fn):
        fn()  # trace
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    forward = timed(lambda: lm.predict_on_batch(inputs))
    generate = timed(lambda: lm.generate(prompt, stop_token_ids=None))
    return dict(part="size_speed", mode=mode, layout=layout, length=length,
                weight_mb=weight_bytes / 2**20, forward_s=forward,
                generate_64_s=generate, rss_mb=_common.current_rss_mb())


def output_change(mode, model):
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.models import test_quantization as t

    inputs = t.tokens()
    if model == "exact_reformer":
        built = t.exact_reformer()
        before = np.asarray(built(inputs))
        built.backbone.quantize(mode)
        built.head.quantize(mode)
        after = np.asarray(built(inputs))
        change = np.abs(after - before).max() / (before.max() - before.min())
    elif model == "hashed_reformer":
        change = t.change(t.reformer(), mode, inputs)
    else:
        change = t.change(t.attention_reference(causal=model == "mha_causal"), mode,
                          inputs)
    return dict(part="output_change", mode=mode, model=model, change=float(change))


def tables(rows):
    """The CSV's rows as the two markdown tables of docs/generation.md."""
    speed = {(r["mode"], r["layout"]): r for r in rows if r.get("part") == "size_speed"}
    base = {layout: speed[("float32", layout)] for layout in ("per_block", "stacked")}
    lines = ["| mode | layout | weights (MiB) | forward, 1 x "
             f"{base['per_block']['length']} tokens (ms) | vs float32 | "
             "generate, 64 tokens (s) | vs float32 |", "|---|---|---|---|---|---|---|"]
    for layout in ("per_block", "stacked"):
        for mode in MODES:
            r, b = speed[(mode, layout)], base[layout]
            lines.append(
                f"| {mode} | {layout.replace('_', '-')} | {float(r['weight_mb']):.2f} | "
                f"{1000 * float(r['forward_s']):.1f} | "
                f"{float(r['forward_s']) / float(b['forward_s']):.2f}x | "
                f"{float(r['generate_64_s']):.2f} | "
                f"{float(r['generate_64_s']) / float(b['generate_64_s']):.2f}x |")
    change = {(r["mode"], r["model"]): float(r["change"])
              for r in rows if r.get("part") == "output_change"}
    lines += ["", "| mode | Reformer, exact attention | MHA model | ratio | "
              "Reformer, hashed (causal LSH) | causal MHA model |",
              "|---|---|---|---|---|---|"]
    for mode in MODES[1:]:
        ours, theirs = change[(mode, "exact_reformer")], change[(mode, "mha")]
        lines.append(
            f"| {mode} | {100 * ours:.1f}% | {100 * theirs:.1f}% | {ours / theirs:.2f}x | "
            f"{100 * change[(mode, 'hashed_reformer')]:.1f}% | "
            f"{100 * change[(mode, 'mha_causal')]:.1f}% |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--point", nargs="+")
    parser.add_argument("--table", action="store_true",
                        help="print the CSV as docs/generation.md's tables")
    args = parser.parse_args()
    if args.table:
        print(tables(_common.read_csv("quantization.csv")))
        return
    if args.point:
        kind, *rest = args.point
        if kind == "size_speed":
            record = size_and_speed(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            record = output_change(rest[0], rest[1])
        _common.emit(record)
        return
    rows = []
    for layout in ("per_block", "stacked"):
        for mode in MODES:
            _common.progress(f"size/speed {layout} {mode}")
            rows.append({"mode": mode, "layout": layout, **_common.run_point(
                __file__, ["size_speed", mode, layout, args.length, args.repeats])})
    for model in ("exact_reformer", "mha", "hashed_reformer", "mha_causal"):
        for mode in MODES[1:]:
            _common.progress(f"output change {model} {mode}")
            rows.append({"mode": mode, "model": model, **_common.run_point(
                __file__, ["output_change", mode, model])})
    print(_common.write_csv("quantization.csv", rows))


if __name__ == "__main__":
    main()
