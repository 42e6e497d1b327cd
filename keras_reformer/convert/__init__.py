"""Checkpoint import: HF transformers' Reformer checkpoints as keras-reformer
models (`ReformerCausalLM.from_transformers`).

- `checkpoint_files`: reading `config.json` and the weights
  (`model.safetensors` with NumPy alone, `pytorch_model.bin` through torch).
- `transformers_reformer`: the config mapped to `ReformerBackbone`
  arguments (refusing what cannot be reproduced), and every tensor mapped
  to its variable.
"""
