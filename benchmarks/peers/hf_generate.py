"""Greedy generation speed of the PyTorch peer (HF ReformerModelWithLMHead).

The model of hf_train_step.py (random init, eval mode, no grad), its
positions and bucket count sized for --max-length (default prompt + new
tokens; benchmarks/generate.py may pass its own so that both sides use the
same bucket count). Timing as benchmarks/generate.py times ours: after one
untimed run of each, the best of --repeats runs of
`generate(prompt, max_new_tokens=1)` (prompt_s: the prompt pass and one
token) and of `max_new_tokens=new_tokens`; per_token_s is their difference
over new_tokens - 1, the cost of one cached decoding step.

    benchmarks/peers/.venv/bin/python benchmarks/peers/hf_generate.py --prompt-length 512 --new-tokens 64

Prints one JSON line (the last stdout line).
"""

import argparse
import contextlib
import io
import time

import hf_common


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-length", type=hf_common.positive_int, required=True)
    parser.add_argument("--new-tokens", type=hf_common.positive_int, required=True)
    parser.add_argument("--max-length", type=hf_common.positive_int,
                        help="positions and buckets to size the model for "
                             "(default prompt length + new tokens)")
    parser.add_argument("--repeats", type=hf_common.positive_int, default=2)
    parser.add_argument("--batch", type=hf_common.positive_int, default=1)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (per-token time is a difference)")
    total = args.prompt_length + args.new_tokens
    max_length = args.max_length or total
    if max_length < total:
        parser.error(f"--max-length {max_length} is below prompt + new tokens ({total})")

    import torch

    cores = hf_common.setup_threads()
    # HF pads the prompt pass to a multiple of the chunk length: cover that.
    c = hf_common.CONFIG["bucket_size"]
    # A fixed hash seed: cached decoding must hash with the prompt's rotations.
    model = hf_common.build(-(-max_length // c) * c, hash_seed=0).eval()
    ids = torch.randint(0, hf_common.CONFIG["vocabulary_size"], (args.batch, args.prompt_length),
                        generator=torch.Generator().manual_seed(0))

    def run(new):
        def call():
            # HF's Reformer prints a "not a recognized input" line per step to
            # stdout; drop them so that the result stays the last line.
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, use_cache=True)
            assert out.shape[1] == args.prompt_length + new, out.shape
        return call

    def best(fn):
        fn()  # untimed: first-call allocations, lazy init
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_short = best(run(1))
    t_long = best(run(args.new_tokens))
    per_token = (t_long - t_short) / (args.new_tokens - 1)
    hf_common.emit({
        "kind": "torch", "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens, "max_length": max_length, "batch": args.batch,
        "per_token_s": round(per_token, 6), "prompt_s": round(t_short, 4),
        "seconds": round(t_long, 4),
        "tokens_per_s": round(args.batch / per_token, 2) if per_token > 0 else None,
        "peak_rss_mb": round(hf_common.peak_rss_mb()), "threads": cores,
        **hf_common.versions(),
    })


if __name__ == "__main__":
    main()
