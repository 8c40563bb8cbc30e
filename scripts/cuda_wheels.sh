#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that scripts/cuda_check.sh needs on the
# lent GPU machine, which has no network. That machine already has Python 3.12, torch 2.11+cu130,
# transformers 5.17, peft, accelerate, onnx, onnx-ir, onnxruntime (CPU), click, rich, safetensors,
# numpy, pyyaml (its package list: /work/.library/device/KINDS.md). phitune itself runs from the
# carried source tree (PYTHONPATH), so only what it imports on the checked paths has to travel.
#
# Usage: scripts/cuda_wheels.sh [DIR]   (default .whl, git-ignored)
# Prints each wheel's size and whether it fits the device tool's 64 MiB per call, which the
# tracked tree (~21 MiB: data/tiny-phi3 is 20 MB) already eats into.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
PY=${PY:-.venv/bin/python}

# name==version and the checked path that needs it. One version of each: two stop the install.
wheels=(
  "bitsandbytes==0.50.2 3:qlora"
  "onnxruntime-genai-cuda==0.18.0 4:auto-opt/infer-cuda"
  "onnxruntime-gpu==1.24.4 4:auto-opt/infer-cuda"
  "gguf==0.19.0 1:smollm2-gguf"
)

download() {
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$dir" "$1" 2> >(grep -v "^WARNING: Location" >&2)
}

tree_mib=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
tree_mib=$((tree_mib / 1048576))
budget=$((64 - tree_mib))
printf '%-40s %8s  %-26s %s\n' wheel MiB path "fits (64 MiB - ${tree_mib} MiB tree = ${budget})"
for entry in "${wheels[@]}"; do
  spec=${entry% *}; path=${entry#* }
  name=${spec%%==*}
  if ! download "$spec"; then
    printf '%-40s %8s  %-26s %s\n' "$spec" - "$path" "no wheel for cp312 manylinux x86_64"
    continue
  fi
  file=$(ls "$dir"/$(echo "$name" | tr - _)-${spec#*==}-*.whl 2>/dev/null | head -1)
  size=$(( $(stat -c %s "$file") / 1048576 ))
  fits=$([ "$size" -le "$budget" ] && echo yes || echo "NO")
  printf '%-40s %8s  %-26s %s\n' "$(basename "$file")" "$size" "$path" "$fits"
done
