"""A checkpoint directory's config and tensors, as dicts of Python values and
NumPy arrays.

safetensors files are read here directly: an 8-byte little-endian header
size, a JSON header naming each tensor's dtype, shape and byte range, then
the bytes. That needs neither torch nor the `safetensors` package.
"""

import json
import os

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
           "U8": np.uint8, "BOOL": np.bool_}


def read_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"`path` must be a checkpoint directory with a config.json. "
            f"Received: path={directory!r} (no {path})"
        )
    with open(path) as f:
        return json.load(f)


def read_safetensors(path):
    """{name: float32/int array} of a .safetensors file (bfloat16 widened)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        raw = data[start:end]
        if entry["dtype"] == "BF16":
            # bfloat16 is float32's upper half.
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif entry["dtype"] in _DTYPES:
            array = np.frombuffer(raw, _DTYPES[entry["dtype"]])
        else:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which "
                f"this reader does not know (known: BF16, {', '.join(_DTYPES)})"
            )
        tensors[name] = array.reshape(entry["shape"]).copy()
    return tensors


def read_pytorch_bin(path):
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch "
            "(`pip install torch`), or convert the checkpoint to "
            "model.safetensors, which this library reads without torch."
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value.float().numpy() if value.is_floating_point() else value.numpy()
            for name, value in state.items()}


def read_tensors(directory):
    """The checkpoint's tensors: model.safetensors, else pytorch_model.bin."""
    for name, reader in (("model.safetensors", read_safetensors),
                         ("pytorch_model.bin", read_pytorch_bin)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return reader(path)
    raise ValueError(
        f"`path` must hold model.safetensors or pytorch_model.bin (sharded "
        f"checkpoints are not supported). Received: path={directory!r}, "
        f"files={sorted(os.listdir(directory))}"
    )
