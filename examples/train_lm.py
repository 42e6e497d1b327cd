"""Train a byte-level Reformer language model with model.fit.

The default run trains on the Python standard library's source files (they
ship with Python: no download) for 1,500 steps of 4 x 1K-byte sequences,
then prints validation bits per byte beside gzip -9's on the same bytes,
exports a SavedModel for TF Serving and samples a continuation of a prompt.
The model is a `ReformerCausalLM` (a keras-hub `CausalLM`) on a
`ReformerBackbone`, with a byte-level `ReformerCausalLMPreprocessor`; the
run also saves a keras-hub preset (`<run-dir>/preset`), which
`examples/generate_from_preset.py --preset <run-dir>/preset` loads with
`keras_hub.models.CausalLM.from_preset`. The sample is keras-hub's
`generate()` (top-k sampler, cached decoding). The training step is compiled
with XLA on every device (`--jit off`: TensorFlow's graph step, which needs
less memory on a CPU).

The defaults go beyond the paper's model in two places, both flags:
`--short-convolution 8` (a causal convolution over the embeddings that hands
each position its 7 predecessors, which LSH attention reaches only when they
share a bucket) and `--value-shift on` (the key at j brings the value at
j + 1, so shared-QK attention can copy what followed an earlier occurrence).
`--value-shift off --short-convolution 0` is the paper's model; both runs,
at the same budget, are in docs/learning.md (`benchmarks/main_job.py`
writes the table).

    python examples/train_lm.py                       # defaults (XLA on GPU/TPU)
    python examples/train_lm.py --seq-len 65536 --data enwik8
    python examples/train_lm.py --strategy mirrored   # all local GPUs, XLA per replica
    TF_CONFIG=... python examples/train_lm.py --strategy multiworker  # one per host
    python examples/train_lm.py --smoke               # seconds, for tests
    tensorboard --logdir runs/train_lm/logs

A killed run started again with the same --run-dir resumes from its last
checkpoint (keras.callbacks.BackupAndRestore, written at every epoch end):
weights, optimizer state, step count and the layers' hashing and dropout
streams, and it skips the training batches it already consumed; it ends
with the weights of an uninterrupted run, bit for bit.

Training is Keras' `model.fit` under every strategy, prepared by
`keras_reformer.distribute.prepare_fit`: XLA compiles the whole step on one
device or a TPU, and each replica's forward/backward pass under `mirrored`
and `multiworker` (where Keras cannot compile the whole step). If another
worker dies, this one stops with an error and exit code 1 instead of
waiting for it. See docs/distributed.md.
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)
import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_reformer as kr  # noqa: E402
from keras_reformer import data, distribute  # noqa: E402
from keras_reformer.text import byte_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", help="text files (default: Python's stdlib sources)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (--smoke: 1)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--validation-steps", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--intermediate-dim", type=int, default=512)
    p.add_argument("--bucket-size", type=int, default=64)
    p.add_argument("--num-hashes", type=int, default=2)
    p.add_argument("--num-buckets", type=int, default=None,
                   help="hash buckets per round (default: LSHAttention's rule, "
                        "2 per bucket_size positions of --seq-len)")
    p.add_argument("--position-embedding", choices=["axial", "sinusoidal", "none"],
                   default="axial")
    p.add_argument("--short-convolution", type=int, default=8,
                   help="width of the causal convolution over the embeddings "
                        "(ReformerBackbone short_convolution); 0: none")
    p.add_argument("--value-shift", choices=["on", "off"], default="on",
                   help="attention keys bring the next position's value, queries "
                        "see strictly earlier keys (ReformerBackbone value_shift)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--learning-rate", type=float, default=4e-3)
    p.add_argument("--clipnorm", type=float, default=1.0,
                   help="gradient clipping (per replica, as Keras does); 0: none")
    p.add_argument("--jit", choices=["auto", "on", "off"], default="auto",
                   help="compile the step with XLA: auto = on, on every device "
                        "(faster on a CPU too); off = TensorFlow's graph step, "
                        "which needs less memory on a CPU")
    p.add_argument("--no-jit", dest="jit", action="store_const", const="off",
                   help="the same as --jit off")
    p.add_argument("--strategy", default="default",
                   choices=["default", "mirrored", "multiworker", "tpu"])
    p.add_argument("--tpu", default="", help="TPU name/address for --strategy tpu")
    p.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into this many logical devices (mirrored on a CPU)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoints, TensorBoard logs, SavedModel export and "
                        "keras-hub preset (default runs/train_lm)")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: a short Python class whose names "
                        "the model can copy; 'def main(' where that does not fit "
                        "--seq-len with --sample-len)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="of the sample's top-k sampler (0: greedy)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--sample-len", type=int, default=200)
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="kill the process (os._exit) after this many steps: for resume tests")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, short sequences, few steps (seconds); "
                        "writes into a temporary folder unless --run-dir is given")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_len, args.epochs, args.steps_per_epoch = 256, 2, 3
        if args.batch_size is None:
            args.batch_size = 1
        args.validation_steps, args.num_layers, args.hidden_dim = 2, 1, 32
        args.intermediate_dim, args.bucket_size, args.sample_len = 64, 32, 16
        if args.run_dir is None:
            args.run_dir = tempfile.mkdtemp(prefix="train_lm_smoke_")
    if args.run_dir is None:
        args.run_dir = os.path.join("runs", "train_lm")
    if args.batch_size is None:
        args.batch_size = 4
    for name in ("seq_len", "batch_size", "epochs", "steps_per_epoch", "validation_steps",
                 "sample_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.short_convolution < 0:
        p.error(f"--short-convolution must be >= 0, got {args.short_convolution}")
    if args.clipnorm < 0:
        p.error(f"--clipnorm must be >= 0, got {args.clipnorm}")
    if args.prompt is None:
        fits = len(DEFAULT_PROMPT.encode("utf-8")) + args.sample_len <= args.seq_len
        args.prompt = DEFAULT_PROMPT if fits else "def main("
    prompt_bytes = len(args.prompt.encode("utf-8"))
    if args.prompt == "" or prompt_bytes + args.sample_len > args.seq_len:
        p.error(f"--prompt ({prompt_bytes} bytes) plus --sample-len ({args.sample_len}) "
                f"must be 1 to --seq-len ({args.seq_len}) bytes: the model is built "
                "for --seq-len positions")
    if args.temperature < 0 or args.top_k < 1:
        p.error(f"--temperature must be >= 0 and --top-k >= 1. Received: "
                f"--temperature {args.temperature}, --top-k {args.top_k}")
    return args


class BatchCounter(keras.callbacks.Callback):
    """Counts the training steps run by this process (a resumed run runs fewer)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


class StopAfter(keras.callbacks.Callback):
    """Simulates a crash after `steps` batches (the process ends at once)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.steps:
            print(f"\nstopping abruptly after {self.steps} steps", flush=True)
            os._exit(3)


# The sample's default prompt: Python with names to reuse. A byte model at
# ~1.8 bits per byte writes Python's shape after it (indentation, `self.`,
# the prompt's own identifiers: long context at work), where after a bare
# `def main(` it drifts (docs/learning.md).
DEFAULT_PROMPT = (
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self.items = []\n"
    "\n"
    "    def push(self, item):\n"
    "        self.items.append(item)\n"
    "\n"
    "    def pop(self):\n"
)


def use_xla(jit):
    """--jit auto: XLA on every device. Keras' jit_compile="auto" turns it
    off on a CPU, but on a CPU too XLA's training step is the faster one
    (measured on 2 cores at 1K-64K tokens, for ~400 MiB more peak memory:
    docs/benchmarks.md, "Graph mode or XLA?"); `--jit off` for graph mode."""
    return jit != "off"


def gzip_bits_per_byte(dataset, steps):
    """gzip -9's bits per byte on the validation bytes the model is scored on
    (the targets of the first `steps` batches, concatenated): a baseline any
    language model should beat."""
    import gzip

    chunks = [y.numpy().astype(np.uint8).tobytes() for _, y in dataset.take(steps)]
    raw = b"".join(chunks)
    return 8 * len(gzip.compress(raw, compresslevel=9)) / max(1, len(raw))


def make_preprocessor(args):
    """Byte-level text in and out, for `generate()`, the text signature of
    the export and the preset. The training windows are raw bytes cut from
    a stream (no start or end tokens), so prompts are packed the same way:
    no start token, no end token."""
    return kr.models.ReformerCausalLMPreprocessor(
        sequence_length=args.seq_len, add_start_token=False, add_end_token=False,
    )


def make_sampler(args):
    """The sample's sampler: top-k at `--temperature` (greedy at 0)."""
    import keras_hub

    if args.temperature == 0:
        return keras_hub.samplers.GreedySampler()
    return keras_hub.samplers.TopKSampler(k=args.top_k, temperature=args.temperature,
                                          seed=args.seed)


def build_model(args):
    """The `ReformerCausalLM` (logits out) and the training optimizer."""
    preprocessor = make_preprocessor(args)
    backbone = kr.models.ReformerBackbone(
        # 256 bytes and the preprocessor's start and end tokens (258).
        vocabulary_size=preprocessor.vocabulary_size,
        num_layers=args.num_layers,
        hidden_dim=args.hidden_dim,
        num_heads=args.num_heads,
        intermediate_dim=args.intermediate_dim,
        bucket_size=args.bucket_size,
        num_hashes=args.num_hashes,
        num_buckets=args.num_buckets,
        dropout=args.dropout,
        position_embedding=(None if args.position_embedding == "none"
                            else args.position_embedding),
        short_convolution=args.short_convolution or None,
        value_shift=args.value_shift == "on",
        max_sequence_length=args.seq_len,
        causal=True,
        seed=args.seed,
    )
    model = kr.models.ReformerCausalLM(backbone, preprocessor=preprocessor)
    total_steps = args.epochs * args.steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, total_steps, alpha=0.1, warmup_target=args.learning_rate,
        warmup_steps=max(1, total_steps // 10),
    )
    return model, keras.optimizers.Adam(schedule, clipnorm=args.clipnorm or None)


def main(argv=None):
    args = parse_args(argv)
    # Device layout and strategy first: both must be set up before any
    # TensorFlow op runs (MultiWorkerMirroredStrategy starts a gRPC server).
    if args.cpu_replicas:
        distribute.use_logical_cpus(args.cpu_replicas)
    strategy = distribute.make_strategy(args.strategy, tpu=args.tpu)
    keras.utils.set_random_seed(args.seed)
    chief = distribute.is_chief()
    # Every worker keeps its own checkpoints and logs (they hold the same
    # weights); the chief's are the run's.
    run_dir = args.run_dir
    if not chief:
        run_dir = os.path.join(run_dir, "%s-%d" % distribute.task_info())
    os.makedirs(run_dir, exist_ok=True)
    backup_dir = os.path.join(run_dir, "backup")

    files = args.data or data.default_corpus_files()
    train_files, val_files = data.split_files(files)
    jit = use_xla(args.jit)
    xla = "off"
    if jit:
        xla = "per replica" if distribute.is_mirrored(strategy) else "whole step"
    print(f"corpus: {len(train_files)} training files, {len(val_files)} validation "
          f"files; sequences of {args.seq_len} bytes; XLA {xla}; "
          f"strategy {args.strategy} ({strategy.num_replicas_in_sync} replicas)")
    global_batch = args.batch_size * strategy.num_replicas_in_sync
    train = data.lm_dataset(train_files, args.seq_len, global_batch, seed=args.seed,
                            with_padding_mask=False)
    # A resumed run continues the data stream where the checkpoint left it.
    skip = distribute.batches_done(backup_dir, args.steps_per_epoch)
    if skip:
        print(f"resuming: skipping the {skip} training batches already seen")
        train = train.skip(skip)
    val = data.lm_dataset(val_files, args.seq_len, global_batch, shuffle=False,
                          with_padding_mask=False)
    # Multi-worker: every worker reads all files and keeps its share of each
    # global batch, so the run sees the batches a single device would
    # (tf.data's default would split by file when it can).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    train, val = train.with_options(options), val.with_options(options)

    with strategy.scope():
        model, optimizer = build_model(args)
        # generate()'s sampler (the model's own optimizer is not used).
        model.compile(sampler=make_sampler(args))
        # Training windows are never padded, so the model is trained through
        # a wrapper that takes the token ids alone (a plain Keras model: the
        # windows are ids already, not text for the preprocessor).
        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        trainer = keras.Model(token_ids, model(
            {"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)}
        ))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        trainer.compile(optimizer, loss, metrics=["accuracy"])
        distribute.prepare_fit(trainer, jit_compile=jit)
        # Optimizer variables are created here, in the scope (mirrored), not
        # lazily by BackupAndRestore outside it.
        optimizer.build(trainer.trainable_variables)
    callbacks = [
        # Checkpoints at epoch ends (an epoch is about two minutes by
        # default): Keras resumes at the start of an epoch, so mid-epoch
        # checkpoints would replay that epoch's first steps.
        keras.callbacks.BackupAndRestore(backup_dir),
        # Scalars per epoch (loss, accuracy, val_*, learning_rate) and the
        # graph of the training step.
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"),
                                    write_graph=True, update_freq="epoch"),
    ]
    counter = BatchCounter()
    callbacks.append(counter)
    if args.stop_after_steps:
        callbacks.append(StopAfter(args.stop_after_steps))
    fit_kwargs = dict(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                      validation_data=val, validation_steps=args.validation_steps,
                      callbacks=callbacks, verbose=1)
    start = time.time()
    try:
        trainer.fit(train, shuffle=False, **fit_kwargs)
        results = trainer.evaluate(val, steps=args.validation_steps, verbose=0,
                                   return_dict=True)
    except tf.errors.OpError as error:
        if args.strategy != "multiworker":
            raise
        # A dead or unreachable peer surfaces as a failed collective or a
        # coordination-service error: say so and exit instead of a traceback.
        kind, index = distribute.task_info()
        lines = [line.strip() for line in error.message.splitlines() if line.strip()]
        detail = next((line for line in lines if re.search(
            r"unavailable|socket|connect|heartbeat|peer|task|timed? ?out", line, re.I
        )), lines[-1] if lines else "")
        print(f"\nerror: {kind} {index}: training stopped because another worker "
              f"failed or became unreachable ({type(error).__name__}: {detail[:300]})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit: a normal exit would wait in TensorFlow's shutdown for
        # the dead peer.
        os._exit(1)
    train_seconds = time.time() - start
    steps = int(trainer.optimizer.iterations.numpy())
    bits = results["loss"] / math.log(2)
    gzip_bits = gzip_bits_per_byte(val, args.validation_steps)
    print(f"validation bits per byte: {bits:.3f} (loss {results['loss']:.4f}, "
          f"accuracy {results['accuracy']:.3f}); gzip -9 on the same bytes: "
          f"{gzip_bits:.3f}; training took {train_seconds:.0f}s, "
          f"{steps} steps ({counter.count} in this run)")

    identical = distribute.replicas_identical(model)
    digest = distribute.weights_digest(model)
    print(f"replicas: {strategy.num_replicas_in_sync}; weights identical on every "
          f"local replica: {identical}; weights digest {digest[:16]}")
    summary = {"bits_per_byte": bits, "gzip_bits_per_byte": gzip_bits, "steps": steps,
               "steps_this_run": counter.count, "train_seconds": train_seconds,
               "replicas": strategy.num_replicas_in_sync,
               "copies_per_weight": distribute.replica_copies(model),
               "replicas_identical": identical, "weights_digest": digest,
               "xla": xla}
    np.savez(os.path.join(run_dir, "final_weights.npz"), *model.get_weights())
    if chief:
        export_path = kr.export.export_saved_model(
            model, os.path.join(run_dir, "export"), version=1,
            text_signature=True, overwrite=True,
        )
        print(f"SavedModel for TF Serving: {export_path}")
        summary["export"] = export_path
        preset_dir = os.path.join(run_dir, "preset")
        model.save_to_preset(preset_dir)
        print(f"keras-hub preset: {preset_dir} (python examples/generate_from_preset.py "
              f"--preset {preset_dir})")
        summary["preset"] = preset_dir
        max_length = len(args.prompt.encode("utf-8")) + args.sample_len
        text = model.generate(args.prompt, max_length=max_length)
        print("sample:\n" + text)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary


if __name__ == "__main__":
    main()
