#!/usr/bin/env bash
# The accelerator check: one command on a machine with a GPU, under 10
# minutes, one JSON line per figure on stdout (progress on stderr).
#
#   bash benchmarks/accelerator_check.sh            # on the GPU machine
#   bash benchmarks/accelerator_check.sh --smoke    # every check, tiny, on a CPU
#   bash benchmarks/accelerator_check.sh --budget-s 300   # all checks in 300 s (default 540)
#   bash benchmarks/accelerator_check.sh --csv accelerator_check.csv   # rows in benchmarks/results/ too
#   bash benchmarks/accelerator_check.sh --only depth_memory cached_decoding   # some checks alone
#
# What it runs and prints: benchmarks/accelerator_check.py and
# docs/benchmarks.md ("The accelerator check"). It downloads nothing. Only
# when keras_reformer cannot be imported does it install, with the README's
# own command (a .venv in the checkout, `pip install -e ".[dev]"`).
# $PYTHON picks the interpreter (default: the checkout's .venv if there is
# one, else python3). Exit status: 0 when every check is "ok", 1 when one is
# not, 2 for a bad argument or a machine whose TensorFlow sees no GPU.
set -euo pipefail

usage="usage: bash benchmarks/accelerator_check.sh [--smoke] [--budget-s SECONDS] [--csv NAME] [--only CHECK ...]"
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) args+=(--smoke) ;;
        --budget-s) [ $# -ge 2 ] || { echo "accelerator_check.sh: --budget-s needs a number of seconds" >&2; exit 2; }
                    args+=(--budget-s "$2"); shift ;;
        --csv) [ $# -ge 2 ] || { echo "accelerator_check.sh: --csv needs a file name" >&2; exit 2; }
               args+=(--csv "$2"); shift ;;
        --only) shift
                [ $# -ge 1 ] || { echo "accelerator_check.sh: --only needs check names" >&2; exit 2; }
                args+=(--only)
                while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do args+=("$1"); shift; done
                continue ;;
        -h | --help) echo "$usage"; exit 0 ;;
        *) echo "accelerator_check.sh: unknown argument '$1'" >&2
           echo "$usage" >&2
           exit 2 ;;
    esac
    shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

if ! "$python" -c "import keras_reformer.models" 2>/dev/null; then
    echo "accelerator_check.sh: keras_reformer is not importable with $python;" \
         "installing as the README says" >&2
    python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" >&2
    python=python
fi
exec "$python" benchmarks/accelerator_check.py ${args[@]+"${args[@]}"}
