"""One full training step of the PyTorch peer (HF ReformerModelWithLMHead).

Same reference configuration as benchmarks/train_step.py: causal, 2 LSH
layers, d 256, 4 heads x 64, FFN 1024 (unchunked, HF's default), bucket 64,
2 hashes, vocabulary 256, no dropout, axial positions, batch 1, Adam. A step
is forward with labels, backward (HF's reversible backward recomputes each
block, as ours does), optimizer.step, zero_grad. Two warm-up steps, then the
best of --steps timed steps, the statistic train_step.py uses for ours.

    benchmarks/peers/.venv/bin/python benchmarks/peers/hf_train_step.py --length 1024 --steps 3

Prints one JSON line (the last stdout line).
"""

import argparse
import statistics

import hf_common


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=hf_common.positive_int, required=True)
    parser.add_argument("--steps", type=hf_common.positive_int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args()
    c = hf_common.CONFIG["bucket_size"]
    l1, l2 = hf_common.axial_shape(args.length)
    # HF's own training-mode constraints, checked up front with our wording.
    if args.length % c or l1 * l2 != args.length:
        parser.error(f"--length must be a multiple of {c} that factors as l1 * l2 with "
                     f"l1 a power of two near sqrt(length) (e.g. 1024, 4096, 16384); "
                     f"got {args.length}")

    import torch
    from transformers import ReformerModelWithLMHead  # noqa: F401

    # The runtime's floor (train_step.py measures ours the same way): RSS
    # once torch and transformers' Reformer are imported, before any model.
    floor = hf_common.current_rss_mb()
    cores = hf_common.setup_threads()
    model = hf_common.build(args.length)
    ids = torch.randint(1, hf_common.CONFIG["vocabulary_size"], (1, args.length),
                        generator=torch.Generator().manual_seed(0))
    times = hf_common.train_step_times(model, ids, args.steps, warmup=2,
                                       learning_rate=args.learning_rate)
    best = min(times)
    peak = hf_common.peak_rss_mb()
    hf_common.emit({
        "model": "hf_reformer", "length": args.length, "steps": args.steps,
        "step_s": round(best, 4), "step_s_median": round(statistics.median(times), 4),
        "tokens_per_s": round(args.length / best),
        "peak_rss_mb": round(peak), "threads": cores,
        "import_rss_mb": round(floor), "above_import_mb": round(peak - floor),
        **hf_common.versions(),
    })


if __name__ == "__main__":
    main()
