"""A training process killed with SIGKILL mid-epoch and started again with
`keras.callbacks.BackupAndRestore` ends bit-identical to an uninterrupted run,
hashing and dropout streams included.

The library's seed-generator states are saved with the weights
(`SeedStatesInWeights`), so a plain `BackupAndRestore` restores them. Keras
3.15 resumes at the start of the epoch the last backup closed, so the data
pipeline skips the batches of the epochs before it
(`distribute.batches_done`). This file run as a script is the trainer:
`python tests/test_resume.py RUN_DIR [--kill-at-step N] [--forget-seeds]`.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
TRAIN_LM = os.path.join(ROOT, "examples", "train_lm.py")
EPOCHS, STEPS_PER_EPOCH, BATCH, LENGTH, VOCAB = 3, 2, 2, 32, 40


# ------------------------------------------------------------- the trainer


def seed_states(model):
    import keras

    return [keras.ops.convert_to_numpy(v.value) for v in model.variables
            if v.name == "seed_generator_state"]


def trainer(argv):
    """Trains a tiny ReformerCausalLM (LSH hashing fresh every step, dropout)
    with a plain BackupAndRestore; writes the final weights and seed states
    to RUN_DIR/final.npz."""
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--kill-at-step", type=int, default=0,
                   help="SIGKILL this process after that many steps, once per run dir")
    p.add_argument("--forget-seeds", action="store_true",
                   help="the control: seed states back to their start after the restore")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import keras
    import tensorflow as tf

    import keras_reformer as kr

    keras.utils.set_random_seed(0)
    backup_dir = os.path.join(args.run_dir, "backup")
    ids = keras.Input((LENGTH,), dtype="int32")
    lm = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
        vocabulary_size=VOCAB, num_layers=2, hidden_dim=16, num_heads=2,
        intermediate_dim=32, feedforward_chunk_size=16, bucket_size=8, num_hashes=2,
        dropout=0.1, attention_dropout=0.1, max_sequence_length=LENGTH, seed=3,
    ))
    model = keras.Model(ids, lm({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)}))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    initial_states = seed_states(model)

    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, (EPOCHS * STEPS_PER_EPOCH * BATCH, LENGTH)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, np.roll(x, -1, axis=1))).batch(BATCH)
    # Keras resumes at an epoch start: skip the batches of the epochs before.
    data = data.skip(kr.distribute.batches_done(backup_dir, STEPS_PER_EPOCH))

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marker = os.path.join(args.run_dir, "killed")
            step = int(self.model.optimizer.iterations.numpy())
            if step == args.kill_at_step and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    class ForgetSeeds(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            states = [v for v in self.model.variables if v.name == "seed_generator_state"]
            for variable, value in zip(states, initial_states):
                variable.assign(value)

    callbacks = [keras.callbacks.BackupAndRestore(backup_dir)]
    callbacks += [ForgetSeeds()] if args.forget_seeds else []
    callbacks += [Kill()] if args.kill_at_step else []
    model.fit(data, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, callbacks=callbacks,
              verbose=0)
    result = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    result.update({f"seed_{i}": s for i, s in enumerate(seed_states(model))})
    result["steps"] = int(model.optimizer.iterations.numpy())
    np.savez(os.path.join(args.run_dir, "final.npz"), **result)


# ------------------------------------------------------------- helpers


def env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")


def train(*runs):
    """Runs the trainer once per `(run_dir, args, expected exit code)`, all
    at once (2 cores: half the wall time of one after the other)."""
    procs = []
    for run_dir, args, _ in runs:
        os.makedirs(run_dir, exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, HERE, os.fspath(run_dir), *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env(),
        ))
    for proc, (_, _, expect) in zip(procs, runs):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == expect, out[-4000:]


def assert_same_arrays(a, b):
    assert sorted(a.files) == sorted(b.files)
    different = [k for k in a.files if not np.array_equal(a[k], b[k])]
    assert not different, different


# ------------------------------------------------------------- the tests


@pytest.mark.slow  # ~30 s, 4 processes; what it rests on (seed states in the weights) is the next test
def test_killed_mid_epoch_resumes_bit_identical(tmp_path):
    whole, resumed, forgot = tmp_path / "whole", tmp_path / "resumed", tmp_path / "forgot"
    # Killed after step 3, the first of the 2nd epoch (steps 3-4), with the
    # backup of the 1st written; the same command again resumes at step 2.
    kill = ["--kill-at-step", str(STEPS_PER_EPOCH + 1)]
    train((whole, [], 0), (resumed, kill, -signal.SIGKILL))
    assert os.path.exists(resumed / "backup" / "latest.weights.h5")
    # The control resumes from the same backup with the seed states left at
    # their start (what a backup without them gave).
    shutil.copytree(resumed, forgot)
    train((resumed, kill, 0), (forgot, kill + ["--forget-seeds"], 0))
    a, b = np.load(whole / "final.npz"), np.load(resumed / "final.npz")
    assert int(a["steps"]) == EPOCHS * STEPS_PER_EPOCH
    assert_same_arrays(a, b)
    c = np.load(forgot / "final.npz")
    assert any(not np.array_equal(a[k], c[k]) for k in a.files if k.startswith("weight_"))


def test_save_weights_keeps_seed_states_and_loads_files_without_them(tmp_path):
    import h5py
    import keras

    import keras_reformer as kr

    def make(stack_weights):
        lm = kr.models.ReformerCausalLM(kr.models.ReformerBackbone(
            vocabulary_size=VOCAB, num_layers=2, hidden_dim=16, num_heads=2,
            intermediate_dim=32, bucket_size=8, dropout=0.1, max_sequence_length=LENGTH,
            seed=3, stack_weights=stack_weights,
        ))
        ids = np.ones((1, LENGTH), "int32")
        lm({"token_ids": ids, "padding_mask": ids}, training=True)
        return lm, ids

    for stack_weights in (False, True):
        lm, ids = make(stack_weights)
        lm({"token_ids": ids, "padding_mask": ids}, training=True)
        # Called twice in training (`lm`) and once (`fresh`): every
        # generator state differs, and the load must bring all of them over.
        fresh, _ = make(stack_weights)
        path = os.fspath(tmp_path / f"stacked{int(stack_weights)}.weights.h5")
        lm.save_weights(path)
        before = seed_states(fresh)
        fresh.load_weights(path)
        assert all(not np.array_equal(a, b) for a, b in zip(before, seed_states(fresh)))
        assert all(np.array_equal(a, b) for a, b in zip(seed_states(fresh), seed_states(lm)))
        # The next training call draws the same masks and hashes (under
        # stack_weights=True the stack's slots hold the blocks' states).
        out = [model({"token_ids": ids, "padding_mask": ids}, training=True)
               for model in (fresh, lm)]
        np.testing.assert_array_equal(*map(keras.ops.convert_to_numpy, out))
        # A weights file without seed states (Keras' own layers write none)
        # still loads, leaving the states as they are.
        with h5py.File(path, "a") as h5:
            names = []
            h5.visit(names.append)
            stale = [n for n in names if "/vars/seed_generator_state_" in n]
            for name in stale:
                del h5[name]
        assert stale
        kept = seed_states(fresh)
        fresh.load_weights(path)
        assert all(np.array_equal(a, b) for a, b in zip(kept, seed_states(fresh)))


# ------------------------------------------------- examples/train_lm.py

# A short run of train_lm.py with dropout (3 epochs of 8 steps): the epoch
# lasts seconds, so a kill on seeing the 1st epoch's backup lands in the 2nd.
TRAIN_LM_FLAGS = ["--no-jit", "--seq-len", "64", "--batch-size", "1", "--epochs", "3",
                  "--steps-per-epoch", "8", "--validation-steps", "1",
                  "--num-layers", "1", "--hidden-dim", "32", "--intermediate-dim", "64",
                  "--bucket-size", "16", "--num-heads", "2", "--dropout", "0.1",
                  "--seed", "0", "--sample-len", "8", "--prompt", "def "]


def start_train_lm(run_dir, tmp_path, workers):
    from tests import test_multiworker as mw

    command = [sys.executable, TRAIN_LM, *TRAIN_LM_FLAGS, "--run-dir", os.fspath(run_dir)]
    if workers == 2:
        return mw.start_workers(command + ["--strategy", "multiworker"], tmp_path)
    log = open(tmp_path / f"{run_dir.name}.log", "a+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(),
                            cwd=ROOT, text=True)
    proc.log = log
    return [proc]


def finish(procs, timeout=600):
    from tests import test_multiworker as mw

    codes, outs = mw.wait_all(procs, timeout)
    assert codes == [0] * len(procs), "\n-----\n".join(o[-3000:] for o in outs)


def kill_in_second_epoch(procs, backup_dir, timeout=600):
    """SIGKILL the last process once the 1st epoch's backup is written."""
    metadata = os.path.join(backup_dir, "training_metadata.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(metadata) as f:
                if json.load(f)["epoch"] >= 1:
                    break
        except (OSError, ValueError):
            pass
        assert all(p.poll() is None for p in procs), "a run ended before its backup"
        time.sleep(0.05)
    procs[-1].send_signal(signal.SIGKILL)
    procs[-1].wait()
    assert procs[-1].returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_train_lm_killed_mid_epoch_resumes_bit_identical(tmp_path, workers):
    """One process (~1.5 min on 2 shared cores); two loopback workers, worker
    1 killed, then both started again (~4 min)."""
    from tests import test_multiworker as mw

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finish(start_train_lm(whole, tmp_path, workers))
    procs = start_train_lm(resumed, tmp_path, workers)
    last = resumed if workers == 1 else resumed / "worker-1"
    kill_in_second_epoch(procs, last / "backup")
    if workers == 2:
        # Worker 0 stops on its own (exit 1: its peer is gone).
        codes, outs = mw.wait_all(procs[:1], timeout=300)
        assert codes == [1], outs[0][-3000:]
    assert not os.path.exists(resumed / "summary.json")
    finish(start_train_lm(resumed, tmp_path, workers))
    for sub in ["."] + (["worker-1"] if workers == 2 else []):
        with open(resumed / sub / "summary.json") as f:
            summary = json.load(f)
        assert summary["steps"] == 24 and summary["steps_this_run"] == 16, summary
        assert_same_arrays(np.load(whole / sub / "final_weights.npz"),
                           np.load(resumed / sub / "final_weights.npz"))


if __name__ == "__main__":
    trainer(sys.argv[1:])
