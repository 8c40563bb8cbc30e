#!/usr/bin/env bash
# A separate virtualenv for llm-compressor, the peer AWQ and GPTQ that `scripts/bench.py quantize`
# compares phitune's against (scripts/llmcompressor_quantize.py). Separate because llmcompressor
# 0.14.0.1 pins transformers <= 5.17 (and compressed-tensors == 0.19.0), while phitune's own venv
# runs a newer transformers.
#
# torch is installed first and then held by a constraint, on purpose: an unpinned torch pulls
# several GB of CUDA packages. llmcompressor 0.14.0.1 allows torch 2.10-2.14.0, so phitune's
# torch==2.13.0 (the CPU build) fits its pins. Where pip's default index would give a CUDA build,
# set LLMC_TORCH_INDEX to a CPU wheel index (e.g. PyTorch's .../whl/cpu).
#
# Usage: bash scripts/llmcompressor_env.sh
#   LLMC_VENV   where to create it (default: .venv-llmcompressor in the repo, gitignored);
#               scripts/bench.py reads the same variable to find it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LLMC_VENV:-.venv-llmcompressor}"
TORCH="${LLMC_TORCH:-2.13.0}"
LLMC="0.14.0.1"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# This workplace's pip config names a local index that warns on every package: keep the noise
# out of the log, and pip's own exit code.
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }

pip_install "torch==$TORCH" ${LLMC_TORCH_INDEX:+--index-url "$LLMC_TORCH_INDEX"}
# Hold the torch just installed (whatever local build it is) while llmcompressor's deps resolve.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -W ignore -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
pip_install -c "$constraints" "llmcompressor==$LLMC"
"$PY" - <<'EOF'
import importlib.metadata as md
import torch
print("llm-compressor env ready:", ", ".join(
    f"{name} {md.version(name)}" for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")),
    "| cuda" if torch.cuda.is_available() else "| cpu")
EOF
