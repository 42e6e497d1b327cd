"""Load a keras-hub preset of a ReformerCausalLM and generate text from it.

A preset is the folder `ReformerCausalLM.save_to_preset` writes (config,
weights, the byte-level preprocessor); `examples/train_lm.py` leaves one in
`<run-dir>/preset`. keras-hub finds our classes once they are imported
(importing them registers them with Keras), so the generic loader works:

    import keras_hub
    from keras_reformer.models import ReformerCausalLM  # noqa: F401  (registers)
    lm = keras_hub.models.CausalLM.from_preset("runs/train_lm/preset")
    lm.compile(sampler="top_k")
    print(lm.generate("def main(", max_length=200))

    python examples/generate_from_preset.py --preset runs/train_lm/preset
    python examples/generate_from_preset.py --preset runs/train_lm/preset \\
        --prompt "import os" --max-length 300 --sampler greedy
    python examples/generate_from_preset.py --smoke   # saves a tiny untrained preset first

Runs offline: a preset is a local folder.
"""

import argparse
import os
import sys
import tempfile

import _quiet  # noqa: F401  (before TensorFlow loads: its start-up logs)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLERS = ("greedy", "top_k", "top_p", "random")


def tiny_preset(path, seq_len=128):
    """Save an untrained byte-level ReformerCausalLM as a preset in `path`."""
    import keras_reformer as kr

    preprocessor = kr.models.ReformerCausalLMPreprocessor(sequence_length=seq_len)
    backbone = kr.models.ReformerBackbone(
        vocabulary_size=preprocessor.vocabulary_size, num_layers=1, hidden_dim=32,
        num_heads=2, intermediate_dim=64, bucket_size=16, short_convolution=4,
        max_sequence_length=seq_len, seed=0,
    )
    kr.models.ReformerCausalLM(backbone, preprocessor=preprocessor).save_to_preset(path)
    return path


def make_sampler(name, temperature, top_k, top_p, seed):
    import keras_hub

    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if name == "top_k":
        return keras_hub.samplers.TopKSampler(k=top_k, temperature=temperature, seed=seed)
    if name == "top_p":
        return keras_hub.samplers.TopPSampler(p=top_p, temperature=temperature, seed=seed)
    return keras_hub.samplers.RandomSampler(temperature=temperature, seed=seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None,
                   help="a preset folder (e.g. <train_lm run-dir>/preset)")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: 'def main(')")
    p.add_argument("--max-length", type=int, default=None,
                   help="length of prompt plus continuation in tokens (default: "
                        "the preprocessor's sequence_length)")
    p.add_argument("--sampler", choices=SAMPLERS, default="top_k")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="without --preset: save a tiny untrained preset into a "
                        "temporary folder and generate from it (seconds)")
    args = p.parse_args(argv)
    if args.preset is None and not args.smoke:
        p.error("--preset is required (or --smoke, which makes a tiny one)")
    if args.preset is not None and not os.path.isdir(args.preset):
        p.error(f"--preset {args.preset}: no such folder")
    if args.max_length is not None and args.max_length < 1:
        p.error(f"--max-length must be >= 1, got {args.max_length}")
    if args.temperature <= 0 and args.sampler != "greedy":
        p.error(f"--temperature must be > 0 (or use --sampler greedy), got "
                f"{args.temperature}")
    if args.prompt is None:
        args.prompt = "def main("
    if args.smoke and args.max_length is None:
        args.max_length = 32

    import keras_hub

    # Registers the Reformer classes with Keras, where keras-hub's loader
    # looks them up (`import keras_reformer` alone does not import them).
    from keras_reformer.models import ReformerCausalLM  # noqa: F401

    preset = args.preset
    if preset is None:
        preset = tiny_preset(os.path.join(tempfile.mkdtemp(prefix="reformer_preset_"),
                                          "preset"))
        print(f"saved a tiny untrained preset: {preset}")
    lm = keras_hub.models.CausalLM.from_preset(preset)
    backbone = lm.backbone
    print(f"loaded {type(lm).__name__} from {preset}: {backbone.num_layers} layers, "
          f"hidden_dim {backbone.hidden_dim}, vocabulary {backbone.vocabulary_size}, "
          f"max_sequence_length {backbone.max_sequence_length}, "
          f"{lm.count_params():,} parameters")
    if lm.preprocessor is None:
        sys.exit(f"{preset} has no preprocessor: text generation needs one")
    lm.compile(sampler=make_sampler(args.sampler, args.temperature, args.top_k,
                                    args.top_p, args.seed))
    text = lm.generate(args.prompt, max_length=args.max_length)
    print(f"generated ({args.sampler}):\n{text}")
    return text


if __name__ == "__main__":
    main()
