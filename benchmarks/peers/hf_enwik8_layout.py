"""The PyTorch peer's side of benchmarks/enwik8_layout.py: HF transformers'
ReformerModelWithLMHead in google/reformer-enwik8's layout, random weights.

    benchmarks/peers/.venv/bin/python benchmarks/peers/hf_enwik8_layout.py --kind train --length 4096

Prints one JSON line (the last stdout line).
"""

import argparse
import contextlib
import io
import os
import sys
import time

import hf_common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from enwik8_layout import config_for, timed_generation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["train", "decode"], required=True)
    parser.add_argument("--length", type=hf_common.positive_int, required=True)
    parser.add_argument("--steps", type=hf_common.positive_int, default=1)
    parser.add_argument("--new-tokens", type=hf_common.positive_int, default=3)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import ReformerConfig, ReformerModelWithLMHead

    transformers.logging.set_verbosity_error()
    cores = hf_common.setup_threads()
    torch.manual_seed(0)
    config = dict(config_for(args.kind, args.length))
    config.pop("model_type")
    model = ReformerModelWithLMHead(ReformerConfig(**config))
    generator = torch.Generator().manual_seed(0)
    record = {"side": "peer", "kind": args.kind, "length": args.length}
    if args.kind == "train":
        ids = torch.randint(2, 258, (1, args.length), generator=generator)
        times = hf_common.train_step_times(model, ids, args.steps, warmup=1,
                                           learning_rate=1e-4)
        record.update(step_s=round(min(times), 2),
                      tokens_per_s=round(args.length / min(times), 1))
    else:
        model.eval()
        prompt = args.length - args.new_tokens
        ids = torch.randint(2, 258, (1, prompt), generator=generator)

        def run(new):
            start = time.perf_counter()
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, use_cache=True)
            assert out.shape[1] == prompt + new, out.shape
            return time.perf_counter() - start

        record.update(timed_generation(run, args.new_tokens))
    record.update(peak_rss_mb=round(hf_common.peak_rss_mb()), threads=cores,
                  **hf_common.versions())
    hf_common.emit(record)


if __name__ == "__main__":
    main()
