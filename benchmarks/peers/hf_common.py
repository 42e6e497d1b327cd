"""The peer's model: HF transformers' ReformerModelWithLMHead shaped like ours.

Runs in the peer venv (benchmarks/peers/setup.sh), never in the library's.
The shape, the bucket rule and the axial rule come from
benchmarks/train_step.py (stdlib-only at import time), so the two sides
cannot drift apart.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The same RSS readings as ours (the peer scripts call them through hf_common).
from _common import current_rss_mb, peak_rss_mb  # noqa: E402,F401
from train_step import CONFIG, axial_shape, num_buckets  # noqa: E402


def build(max_length, hash_seed=None):
    """ReformerModelWithLMHead in the reference configuration, random init."""
    import torch
    import transformers
    from transformers import ReformerConfig, ReformerModelWithLMHead

    transformers.logging.set_verbosity_error()  # padding / loss-type notes
    torch.manual_seed(0)
    d, c = CONFIG["hidden_dim"], CONFIG["bucket_size"]
    buckets = num_buckets(max_length, c)
    config = ReformerConfig(
        attn_layers=["lsh"] * CONFIG["num_layers"],
        is_decoder=True,  # causal
        hidden_size=d,
        num_attention_heads=CONFIG["num_heads"],
        attention_head_size=CONFIG["key_dim"],
        feed_forward_size=CONFIG["intermediate_dim"],
        hidden_act="gelu",  # ours is gelu; HF's default is relu
        vocab_size=CONFIG["vocabulary_size"],
        lsh_attn_chunk_length=c,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        num_hashes=CONFIG["num_hashes"],
        # Our bucket rule, not HF's power-of-two one: the same work per query.
        num_buckets=buckets[0] if len(buckets) == 1 else list(buckets),
        hash_seed=hash_seed,
        axial_pos_embds=True,
        axial_pos_shape=axial_shape(max_length),
        axial_pos_embds_dim=(d // 2, d - d // 2),  # ours: halves
        max_position_embeddings=max_length,
        chunk_size_feed_forward=0,  # unchunked FFN (HF's default)
        chunk_size_lm_head=0,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        # No early stop in generate(): token 2 is an ordinary byte here.
        eos_token_id=None,
        pad_token_id=0,
    )
    return ReformerModelWithLMHead(config)


def setup_threads():
    """Use every core this process may run on, as TF does by default."""
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    return cores


def versions():
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def positive_int(text):
    """argparse type: an int >= 1, with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def emit(record):
    """The result is the last stdout line, plain JSON (callers parse that)."""
    print(json.dumps(record), flush=True)


def train_step_times(model, ids, steps, warmup, learning_rate):
    """Wall-clock seconds of `steps` training steps (forward with labels,
    which HF shifts itself, backward, Adam, zero_grad) after `warmup`
    untimed ones. HF's reversible backward needs training mode."""
    import time

    import torch

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times
