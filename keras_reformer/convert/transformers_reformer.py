"""HF transformers' `ReformerModelWithLMHead` checkpoints -> `ReformerCausalLM`.

The reference's model maps onto `ReformerBackbone` with its options
`attention_types`, `reference_rules`, `attention_bias=False`,
`hidden_activation`, `axial_dims` and `layer_norm_epsilon`: the same
reversible pairs (attention stream first), the final LayerNorm over the
concatenated streams, and an LM head on them. What it cannot reproduce is
refused with the config field's name.
"""

import math
import os

import numpy as np

from keras_reformer import _checks
from keras_reformer.convert import checkpoint_files

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}


def _refuse(field, value, allowed):
    raise ValueError(
        f"This checkpoint cannot be reproduced: config field `{field}` is "
        f"{value!r}; supported: {allowed}."
    )


def backbone_arguments(config):
    """`ReformerBackbone` keyword arguments for a reference config (a dict)."""
    if config.get("model_type") != "reformer":
        _refuse("model_type", config.get("model_type"), "'reformer'")
    if not config.get("is_decoder", False):
        _refuse("is_decoder", config.get("is_decoder"),
                "True (a causal language model)")
    kinds = list(config["attn_layers"])
    for kind in kinds:
        if kind not in ("lsh", "local"):
            _refuse("attn_layers", kinds, "entries 'lsh' and 'local'")
    activation = config.get("hidden_act", "relu")
    if activation not in ACTIVATIONS:
        _refuse("hidden_act", activation, sorted(ACTIVATIONS))
    if not config.get("axial_pos_embds", True):
        _refuse("axial_pos_embds", False, "True (axial position embeddings)")
    if config.get("lsh_num_chunks_after", 0):
        _refuse("lsh_num_chunks_after", config["lsh_num_chunks_after"], 0)
    buckets = config.get("num_buckets")
    if buckets is None:
        _refuse("num_buckets", None, "an even int or a list of two even ints "
                "(a trained checkpoint has it set)")
    if isinstance(buckets, (list, tuple)):
        buckets = buckets[0] if len(buckets) == 1 else tuple(buckets)
    lsh_dropout = config.get("lsh_attention_probs_dropout_prob", 0.0) or 0.0
    local_dropout = config.get("local_attention_probs_dropout_prob", 0.0) or 0.0
    axial_shape = tuple(config["axial_pos_shape"])
    return dict(
        vocabulary_size=config["vocab_size"],
        num_layers=len(kinds),
        hidden_dim=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        key_dim=config["attention_head_size"],
        intermediate_dim=config["feed_forward_size"],
        hidden_activation=ACTIVATIONS[activation],
        bucket_size=config["lsh_attn_chunk_length"],
        num_hashes=config.get("num_hashes", 1),
        num_buckets=buckets,
        num_chunks_before=config.get("lsh_num_chunks_before", 1),
        attention_types=kinds,
        local_chunk_length=config["local_attn_chunk_length"],
        local_num_chunks_before=config.get("local_num_chunks_before", 1),
        local_num_chunks_after=config.get("local_num_chunks_after", 0),
        dropout=config.get("hidden_dropout_prob", 0.0) or 0.0,
        attention_dropout=lsh_dropout,
        local_attention_dropout=local_dropout,
        max_sequence_length=min(config["max_position_embeddings"],
                                math.prod(axial_shape)),
        axial_shape=axial_shape,
        axial_dims=tuple(config["axial_pos_embds_dim"]),
        layer_norm_epsilon=config.get("layer_norm_eps", 1e-12),
        attention_bias=False,
        reference_rules=True,
        causal=True,
        stack_weights=False,
        **({"seed": config["hash_seed"]} if config.get("hash_seed") is not None else {}),
    )


class _Tensors:
    """The checkpoint's tensors, each taken once; what is left is an error."""

    def __init__(self, tensors):
        self.tensors = dict(tensors)

    def take(self, name):
        if name not in self.tensors:
            raise ValueError(f"The checkpoint has no tensor {name!r}.")
        return self.tensors.pop(name)

    def finish(self, ignorable=()):
        left = sorted(k for k in self.tensors if k not in ignorable)
        if left:
            raise ValueError(
                f"The checkpoint has tensors this model has no place for: {left}"
            )


def _assign(variable, value, name):
    value = np.asarray(value, np.float32)
    if tuple(variable.shape) != value.shape:
        raise ValueError(
            f"Tensor {name!r} of shape {value.shape} does not fit the variable "
            f"{variable.path} of shape {tuple(variable.shape)}."
        )
    variable.assign(value.astype(variable.dtype))


def _heads_in(weight, heads):
    """A torch Linear weight (heads * D, H) -> an EinsumDense kernel (H, heads, D)."""
    return weight.T.reshape(weight.shape[1], heads, -1)


def load_weights(lm, tensors):
    """Assigns every checkpoint tensor to `lm`'s variables (per-block weights)."""
    backbone = lm.backbone
    heads = backbone.num_heads
    t = _Tensors(tensors)

    def norm(layer, prefix):
        _assign(layer.gamma, t.take(prefix + ".weight"), prefix + ".weight")
        _assign(layer.beta, t.take(prefix + ".bias"), prefix + ".bias")

    def linear(dense, name, bias=True, transform=None):
        weight = t.take(name + ".weight")
        kernel = weight.T if transform is None else transform(weight)
        _assign(dense.kernel, kernel, name + ".weight")
        if bias:
            _assign(dense.bias, t.take(name + ".bias"), name + ".bias")

    def split(weight):
        return _heads_in(weight, heads)

    embeddings = "reformer.embeddings."
    _assign(backbone.token_embedding.embeddings,
            t.take(embeddings + "word_embeddings.weight"), "word_embeddings")
    axial = backbone.position_embedding
    for index, variable in enumerate((axial.first, axial.second)):
        name = f"{embeddings}position_embeddings.weights.{index}"
        value = t.take(name)
        _assign(variable, value.reshape(-1, value.shape[-1]), name)
    for i, (f, g) in enumerate(backbone.reversible_stack.blocks):
        layer = f"reformer.encoder.layers.{i}."
        norm(f.norm, layer + "attention.layer_norm")
        attention = layer + "attention.self_attention."
        if f.attention_type == "lsh":
            linear(f.attention.qk_dense, attention + "query_key", False, split)
        else:
            linear(f.attention.query_dense, attention + "query", False, split)
            linear(f.attention.key_dense, attention + "key", False, split)
        linear(f.attention.value_dense, attention + "value", False, split)
        linear(f.attention.output_dense, layer + "attention.output.dense", False,
               lambda w: w.T.reshape(heads, -1, w.shape[0]))
        norm(g.norm, layer + "feed_forward.layer_norm")
        linear(g.feed_forward.intermediate_dense, layer + "feed_forward.dense.dense")
        linear(g.feed_forward.output_dense, layer + "feed_forward.output.dense")
    norm(backbone.final_norm, "reformer.encoder.layer_norm")
    _assign(lm.lm_head.kernel, t.take("lm_head.decoder.weight").T, "lm_head.decoder.weight")
    bias = "lm_head.decoder.bias" if "lm_head.decoder.bias" in t.tensors else "lm_head.bias"
    _assign(lm.lm_head.bias, t.take(bias), bias)
    # `lm_head.bias` is the reference's alias of the decoder's bias (tied in
    # the versions that saved both; transformers 5 computes with the decoder's).
    t.finish(ignorable=("lm_head.bias",))


def from_transformers(cls, path, rotations=None, dtype=None, preprocessor="auto"):
    """See `ReformerCausalLM.from_transformers`."""
    from keras_reformer.models.reformer_causal_lm_preprocessor import (
        ReformerCausalLMPreprocessor,
    )

    if not (isinstance(preprocessor, str) and preprocessor == "auto"):
        _checks.instance(
            "preprocessor", preprocessor, ReformerCausalLMPreprocessor,
            '"auto" (the checkpoint\'s tokenizer), None (the model takes ids) '
            "or a ReformerCausalLMPreprocessor", allow_none=True,
        )
    from keras_reformer.models.reformer_backbone import ReformerBackbone

    config = checkpoint_files.read_config(path)
    tensors = checkpoint_files.read_tensors(path)
    backbone = ReformerBackbone(**backbone_arguments(config), dtype=dtype)
    if isinstance(preprocessor, str):
        preprocessor = checkpoint_preprocessor(path, config, backbone)
    lm = cls(backbone, preprocessor=preprocessor)
    load_weights(lm, tensors)
    if rotations is not None:
        set_rotations(backbone, rotations)
    return lm


# The byte layout of google/reformer-enwik8 (tensor2tensor's byte encoder).
BYTE_VOCABULARY_SIZE = 258
SENTENCE_PIECE_FILE = "spiece.model"


def checkpoint_preprocessor(path, config, backbone):
    """The checkpoint's tokenizer in a `ReformerCausalLMPreprocessor`, or
    None: SentencePiece when the directory has `spiece.model`, else bytes + 2
    for a vocabulary of 258, else None (the model takes ids). No start token
    in either: the reference's tokenizers add none."""
    from keras_reformer.models.reformer_causal_lm_preprocessor import (
        ReformerCausalLMPreprocessor,
    )
    from keras_reformer.models.reformer_sentence_piece_tokenizer import (
        ReformerSentencePieceTokenizer,
    )
    from keras_reformer.models.reformer_tokenizer import ReformerTokenizer

    spiece = os.path.join(path, SENTENCE_PIECE_FILE)
    if os.path.isfile(spiece):
        with open(spiece, "rb") as f:
            tokenizer = ReformerSentencePieceTokenizer(proto=f.read())
        if tokenizer.vocabulary_size() != config["vocab_size"]:
            raise ValueError(
                f"{spiece} has {tokenizer.vocabulary_size()} pieces; the model's "
                f"config has vocab_size={config['vocab_size']}."
            )
    elif config["vocab_size"] == BYTE_VOCABULARY_SIZE:
        tokenizer = ReformerTokenizer(byte_offset=2)
    else:
        return None
    return ReformerCausalLMPreprocessor(
        tokenizer, sequence_length=min(1024, backbone.max_sequence_length),
        add_start_token=False,
    )


def set_rotations(backbone, rotations):
    """Gives every LSH layer the reference's rotations, an array of shape
    (heads, key_dim, num_hashes, sum(num_buckets) / 2)."""
    rotations = np.asarray(rotations, np.float32)
    for f, _ in backbone.reversible_stack.blocks:
        if f.attention_type == "lsh":
            _assign(f.attention.rotations, rotations, "rotations")
