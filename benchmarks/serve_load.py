"""A served model under load: the example's SavedModel answering concurrent
clients in a process that has TensorFlow and nothing of this package.

The parent exports `examples/export_and_serve.py`'s model (its
`load_or_build` and `export`), then starts a fresh process that imports
TensorFlow only (it asserts that neither keras nor keras_reformer is
loaded), loads the SavedModel and:

1. builds a fixed random pool of `--distinct` requests over every signature
   the export has (`serving_default`, `with_padding_mask`, `generate`,
   `generate_text`, and the `*_sampled` ones if exported): mixed batch
   sizes (1-8) and lengths (1-`--max-request-length`), prompts with right
   padding, `max_length` up to `--max-new` tokens past the prompt;
2. answers each pool request once, sequentially: the reference answers;
3. runs `--clients` threads that call the signatures on a fixed random
   schedule of `--requests` draws from the pool, each answer compared
   (exactly) with its reference, and the process's RSS read at requests
   200, 2,000, 4,000 and 6,000 (and every `--trace` requests);
4. interleaves malformed requests (one in `--malformed-every`): wrong
   dtype, wrong rank, a length above the maximum, an empty batch, each
   against a logits and a generation signature; every one must raise
   `tf.errors.InvalidArgumentError` (what TF Serving returns as
   INVALID_ARGUMENT: a signature called in-process fails the way the
   server's session run does), and the requests after it must still be
   answered.

    python benchmarks/serve_load.py                  # 6,000 requests, 8 clients
    python benchmarks/serve_load.py --smoke          # ~100 requests, 3 clients
    python benchmarks/serve_load.py --shapes repeated --requests 2000
    python benchmarks/serve_load.py --model matmul   # the control: plain TF

`--shapes repeated` gives every logits request one shape (batch 4, length
`--max-request-length`), to tell per-shape memory from the rest;
`--model matmul` serves a plain `tf.function` (an embedding lookup and two
matmuls, width 256) on the same schedule: what TensorFlow's
runtime does with the same request shapes without any of our layers.

Writes benchmarks/results/serve_load.csv (`--smoke`, `--saved-model`,
`--shapes repeated`, `--model matmul`: a git-ignored tmp_serve_load_*.csv,
unless `--csv` names one): one row per RSS reading with the run's
requests, clients, mismatches, malformed requests handled, RSS at start,
after loading and after the reference answers, and the growth from 2,000
to 6,000 requests (`growth`: medians of the first and last quarter of
that span), and prints a summary. Exits 1 if an answer differs from its reference or a malformed
request is not an InvalidArgumentError.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINTS = (200, 2000, 4000, 6000)
MALFORMED = ("wrong_dtype", "wrong_rank", "too_long", "empty_batch")
GENERATE = ("generate", "generate_sampled")
TEXT = ("generate_text", "generate_text_sampled")
SMOKE = dict(requests=100, clients=3, distinct=24, max_request_length=64, max_new=6,
             malformed_every=10, trace=25)
TEXTS = ("def main(", "import ", "héllo, wörld", "x", "class A:\n    ", "0123456789")


# --- the served side: TensorFlow only -------------------------------------

def make_request(rng, signature, args):
    """One well-formed request (numpy inputs) for `signature`."""
    batch = int(rng.choice([1, 2, 3, 4, 8]))
    if signature in TEXT:
        text = np.array([rng.choice(TEXTS).encode() for _ in range(batch)], object)
        feed = {"text": text, "max_length": np.int32(rng.integers(12, 13 + args.max_new))}
    else:
        prompt = signature in GENERATE
        width = int(rng.integers(1, (32 if prompt else args.max_request_length) + 1))
        if args.shapes == "repeated" and not prompt:
            batch, width = 4, args.max_request_length
        feed = {"token_ids": rng.integers(0, 256, (batch, width), np.int32)}
        if signature != "serving_default":
            lengths = rng.integers(1, width + 1, batch)
            lengths[0] = width
            mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
            feed.update(padding_mask=mask, token_ids=feed["token_ids"] * mask)
        if prompt:
            feed["max_length"] = np.int32(width + rng.integers(1, args.max_new + 1))
    if signature.endswith("_sampled"):
        feed["seed"] = np.int32(rng.integers(0, 1000))
    return signature, feed


def make_malformed(kind, signature, args):
    """A malformed request of `kind` for `signature` (a logits or generate one)."""
    ids = np.ones((2, 8), np.int32)
    if kind == "wrong_dtype":
        ids = ids.astype(np.int64)
    elif kind == "wrong_rank":
        ids = ids[0]
    elif kind == "too_long":
        ids = np.ones((1, args.max_sequence_length + 1), np.int32)
    elif kind == "empty_batch":
        ids = ids[:0]
    feed = {"token_ids": ids}
    if signature in GENERATE:
        feed.update(padding_mask=np.ones(ids.shape, np.int32),
                    max_length=np.int32(min(ids.shape[-1] + 4, args.max_sequence_length)))
    return signature, feed


def schedule(rng, pool_size, args, signatures):
    """The clients' requests in order: pool indices, and ("malformed", kind,
    signature) entries interleaved, one in `--malformed-every`."""
    bad_targets = [s for s in ("serving_default", "generate") if s in signatures]
    entries, bad = [], 0
    for i in range(args.requests):
        if args.malformed_every and i % args.malformed_every == args.malformed_every - 1:
            entries.append(("malformed", MALFORMED[bad % len(MALFORMED)],
                            bad_targets[(bad // len(MALFORMED)) % len(bad_targets)]))
            bad += 1
        else:
            entries.append(int(rng.integers(pool_size)))
    return entries


def digest(array):
    """A hash of `array`'s shape, dtype and exact contents (strings too)."""
    data = (repr([len(x) for x in array.ravel()]).encode() + b"".join(array.ravel())
            if array.dtype == object else np.ascontiguousarray(array).tobytes())
    return hashlib.sha256(f"{array.shape} {array.dtype}".encode() + data).hexdigest()


def rss_mb():
    return round(_common.current_rss_mb(), 1)


def serve_matmul():
    """The control: a plain tf.function (an embedding lookup and two
    matmuls, width 256), the exported signatures' way: one concrete function
    with dynamic batch and length."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    table = tf.constant(rng.normal(size=(258, 256)).astype(np.float32))
    w1 = tf.constant(rng.normal(size=(256, 256)).astype(np.float32))
    w2 = tf.constant(rng.normal(size=(256, 258)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def logits(token_ids):
        hidden = tf.nn.relu(tf.gather(table, token_ids) @ w1)
        return {"logits": hidden @ w2}

    fn = logits.get_concrete_function()
    return {"serving_default": fn, "with_padding_mask": (
        lambda token_ids, padding_mask: fn(token_ids=token_ids))}


def serve(args):
    """The child: load, reference answers, clients; prints the record."""
    # What a model server has: TensorFlow, nothing of ours, no Keras (which
    # `import tensorflow` would otherwise load for `tf.keras`), no TF Text.
    for name in ("keras", "keras_hub", "keras_reformer", "tensorflow_text"):
        assert sys.modules.get(name) is None, f"the served process imported {name}"
        sys.modules[name] = None
    import tensorflow as tf

    start_rss = rss_mb()
    if args.model == "matmul":
        signatures = serve_matmul()
        args.malformed_every = 0  # the control checks nothing
    else:
        loaded = tf.saved_model.load(args.serve)
        signatures = dict(loaded.signatures)
    known = ("serving_default", "with_padding_mask") + GENERATE + TEXT
    names = [s for s in known if s in signatures]
    loaded_rss = rss_mb()

    rng = np.random.default_rng(args.seed)
    # Logits requests are cheap, generation ones cost a forward pass per token.
    weights = np.array([{"serving_default": 4, "with_padding_mask": 3}.get(s, 1)
                        for s in names], float)
    pool = [make_request(rng, str(rng.choice(names, p=weights / weights.sum())), args)
            for _ in range(args.distinct)]
    entries = schedule(rng, len(pool), args, names)

    def call(signature, feed):
        """The answer's digest: exact equality, without holding every
        reference answer (up to 2 MiB each) in the measured process."""
        out = signatures[signature](**{k: tf.constant(v) for k, v in feed.items()})
        return {k: digest(v.numpy()) for k, v in out.items()}

    started = time.time()
    reference = [call(*request) for request in pool]
    reference_s = time.time() - started
    reference_rss = rss_mb()

    lock = threading.Lock()
    state = dict(next=0, done=0, mismatches=0, malformed_ok=0, malformed_bad=[],
                 errors=[], rss={}, trace=[], kinds={})
    checkpoints = set(CHECKPOINTS) | set(range(args.trace, args.requests + 1, args.trace))

    def client():
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(entries):
                return
            entry = entries[i]
            mismatch = malformed_ok = 0
            failure = None
            if isinstance(entry, tuple):
                _, kind, signature = entry
                try:
                    call(*make_malformed(kind, signature, args))
                    failure = f"{kind} on {signature}: answered"
                except tf.errors.InvalidArgumentError:
                    malformed_ok = 1
                    with lock:
                        key = f"{kind} {signature}"
                        state["kinds"][key] = state["kinds"].get(key, 0) + 1
                except Exception as e:  # noqa: BLE001 - recorded and reported
                    failure = f"{kind} on {signature}: {type(e).__name__}: {e}"[:300]
            else:
                try:
                    mismatch = int(call(*pool[entry]) != reference[entry])
                except Exception as e:  # noqa: BLE001 - recorded and reported
                    state["errors"].append(f"request {i}: {type(e).__name__}: {e}"[:300])
                    mismatch = 1
            with lock:
                state["done"] += 1
                state["mismatches"] += mismatch
                state["malformed_ok"] += malformed_ok
                if failure:
                    state["malformed_bad"].append(failure)
                done = state["done"]
                if done in checkpoints:
                    rss = rss_mb()
                    state["trace"].append((done, rss))
                    if done in CHECKPOINTS:
                        state["rss"][done] = rss

    started = time.time()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _common.emit(dict(
        model=args.model, shapes=args.shapes, requests=len(entries),
        clients=args.clients, distinct=len(pool), signatures=" ".join(names),
        malformed=sum(isinstance(e, tuple) for e in entries),
        malformed_handled=state["malformed_ok"], malformed_failures=state["malformed_bad"],
        malformed_by_kind=state["kinds"],
        mismatches=state["mismatches"], errors=state["errors"][:5],
        rss_start_mb=start_rss, rss_loaded_mb=loaded_rss,
        rss_after_reference_mb=reference_rss, reference_s=round(reference_s, 1),
        load_s=round(time.time() - started, 1),
        rss_mb={str(k): v for k, v in sorted(state["rss"].items())},
        trace=sorted(state["trace"])))


# --- the parent: export, then the served process ---------------------------

def export_example(export_dir, smoke):
    """The example's model, exported as the example does; (path, its
    max_sequence_length)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import export_and_serve

    model = export_and_serve.load_or_build(smoke=smoke)
    path = export_and_serve.export(model, export_dir)
    return path, model.backbone.max_sequence_length


def run(args, argv):
    """Export (unless `--saved-model`), run the served process; its record."""
    if args.model == "matmul":
        path, limit = "", 4096
    elif args.saved_model:
        path, limit = args.saved_model, args.max_sequence_length
    else:
        export_dir = tempfile.mkdtemp(prefix="serve_load_")
        _common.progress(f"exporting the example's model to {export_dir}")
        path, limit = export_example(export_dir, args.smoke)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--serve", path,
           "--max-sequence-length", str(limit)]
    _common.progress(f"serving {path or 'the matmul control'}: {args.requests} "
                     f"requests, {args.clients} clients")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Not even on the path: the served process must not be able to import us.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and os.path.abspath(p) != ROOT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir())
    finally:
        if path and not args.saved_model:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the served process failed (rc={proc.returncode}):\n"
                         + proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def rows(record):
    """The CSV rows: one per RSS reading (the checkpoints and every
    `--trace` requests), with the run's counts, its RSS before the load and
    its `growth`."""
    keep = ("model", "shapes", "requests", "clients", "distinct", "mismatches",
            "malformed", "malformed_handled", "rss_start_mb", "rss_loaded_mb",
            "rss_after_reference_mb")
    change = growth(record)
    return [dict(checkpoint=int(at), rss_mb=rss, **{k: record[k] for k in keep},
                 growth_pct=None if change is None else round(change, 2))
            for at, rss in record["trace"]]


def growth(record, frm=2000, to=6000):
    """RSS growth from request `frm` to `to`, percent (None if not reached).

    Each end is the median of the readings in the first and the last
    quarter of the span (2,000-3,000 and 5,000-6,000 with the defaults): a
    single reading moves by 10-20 MiB with whatever the threads hold at
    that moment, while a leak moves the whole later quarter."""
    span = (to - frm) // 4
    early = [rss for at, rss in record["trace"] if frm <= at <= frm + span]
    late = [rss for at, rss in record["trace"] if to - span <= at <= to]
    if not early or not late or record["trace"][-1][0] < to:
        return None
    return 100.0 * (float(np.median(late)) - float(np.median(early))) / float(np.median(early))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--distinct", type=int, default=200,
                   help="distinct requests in the pool the schedule draws from")
    p.add_argument("--max-request-length", type=int, default=256)
    p.add_argument("--max-new", type=int, default=16,
                   help="most tokens a generation request adds to its prompt")
    p.add_argument("--malformed-every", type=int, default=50)
    p.add_argument("--shapes", choices=["mixed", "repeated"], default="mixed")
    p.add_argument("--model", choices=["example", "matmul"], default="example")
    p.add_argument("--trace", type=int, default=500, help="RSS read every N requests too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="the example's smoke model, 100 requests, 3 clients")
    p.add_argument("--saved-model", help="serve this SavedModel version folder "
                   "instead of exporting (with --max-sequence-length)")
    p.add_argument("--max-sequence-length", type=int, default=4096)
    p.add_argument("--csv", default=None)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.serve is not None:
        return serve(args)
    record = run(args, argv)
    default = not (args.smoke or args.saved_model) and (args.model, args.shapes) == (
        "example", "mixed")
    name = args.csv or ("serve_load.csv" if default else "tmp_serve_load_"
                        f"{args.model}_{args.shapes}{'_smoke' if args.smoke else ''}.csv")
    path = _common.write_csv(name, rows(record))
    change = growth(record)
    print(f"{record['requests']} requests ({record['malformed']} malformed), "
          f"{record['clients']} clients, {record['distinct']} distinct requests over "
          f"{record['signatures']}")
    print(f"RSS MiB: start {record['rss_start_mb']}, loaded {record['rss_loaded_mb']}, "
          f"after the reference answers {record['rss_after_reference_mb']}"
          + "".join(f", at request {k}: {v}" for k, v in record["rss_mb"].items())
          + ("" if change is None else "; growth 2,000 -> 6,000 (medians of the "
                                        f"first and last quarters): {change:+.2f}%"))
    print("trace: " + " ".join(f"{at}:{rss}" for at, rss in record["trace"]))
    print(f"mismatches: {record['mismatches']}, malformed handled: "
          f"{record['malformed_handled']}/{record['malformed']}, "
          f"{record['load_s']} s under load")
    for failure in record["malformed_failures"][:5] + record["errors"]:
        print("  " + failure)
    print(f"wrote {path}")
    ok = not record["mismatches"] and record["malformed_handled"] == record["malformed"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
