#!/usr/bin/env bash
# Builds benchmarks/peers/.venv: the PyTorch Reformer (HF transformers) that
# benchmarks/train_step.py --peer and benchmarks/generate.py compare against.
# A benchmark-only dependency: keras_reformer/ and tests/ never import it.
#
#     bash benchmarks/peers/setup.sh          # idempotent; re-run to repair
set -euo pipefail

# Pinned together: torch first and alone (the CPU build), so that resolving
# transformers never swaps in another torch with GBs of CUDA packages.
# transformers 5.24.0 still ships ReformerModelWithLMHead and needs no torch
# pin of its own (torch is an extra there, which we do not ask for).
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.24.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)
# The CPU wheel: from a local wheel directory when pip has one (find-links),
# else PyTorch's CPU index; never the default CUDA build.
"${pip[@]}" "torch==$TORCH_VERSION" 2>/dev/null \
    || "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
# The constraint keeps the torch just installed whatever transformers asks.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
"${pip[@]}" -c "$constraints" "transformers==$TRANSFORMERS_VERSION"
# sentencepiece and protobuf: HF's ReformerTokenizer reads spiece.model with them
# (reformer_fixtures.py trains one).
"${pip[@]}" -c "$constraints" sentencepiece protobuf

"$venv/bin/python" - <<'PY'
import torch, transformers
from transformers import ReformerConfig, ReformerModelWithLMHead  # noqa: F401
print(f"peer venv ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
