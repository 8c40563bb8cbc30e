#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that scripts/cuda_check.sh needs on the
# lent GPU machine, which has no network. That machine already has Python 3.12, torch 2.11+cu130,
# transformers 5.17, peft, accelerate, onnx, onnx-ir, onnxruntime 1.30 (CPU), click, rich,
# safetensors, numpy, pyyaml, pyarrow (its package list: /work/.library/device/KINDS.md).
# phitune itself runs from the carried source tree (PYTHONPATH), and imports datasets (a saved
# dataset dir), starlette/uvicorn/pydantic (serve) and gguf (-m FILE.gguf) only where used: the
# check needs none of them.
#
# Usage: scripts/cuda_wheels.sh [DIR]   (default .whl, git-ignored; .whl-big/ for what cannot travel)
# The device tool carries at most 64 MiB per call, tracked tree included (~21 MiB: data/tiny-phi3).
# Prints each wheel's size, whether it fits beside the tree, and the path it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
big=.whl-big
model_dir=.whl-model
mkdir -p "$dir" "$big" "$model_dir"
PY=${PY:-.venv/bin/python}

# name==version, the path that needs it, where it goes. One version of each: two break the install.
wheels=(
  # ships libbitsandbytes for CUDA 11.8..13.2 and ROCm (123 MiB unpacked, 41 MiB wheel); the GPU
  # machine's torch is cu130, so a slim copy keeps the CPU and cuda130 libraries only (below)
  "bitsandbytes==0.50.2 3:qlora $dir"
  # the builder (auto-opt --device gpu) and the CUDA runtime of infer; needs onnxruntime-gpu>=1.31
  "onnxruntime-genai-cuda==0.18.0 4:auto-opt+infer $dir"
  # CUDA 13 build (libcudart.so.13, libcublas.so.13): matches the machine, but its CUDA provider
  # library alone is 284 MB: it cannot travel in one call
  "onnxruntime-gpu==1.31.1 4b:infer-on-cuda $big"
  # only for the SmolLM2 slice (path 1's second model), carried in a call of its own (below)
  "gguf==0.19.0 1:smollm2-slice $model_dir"
)

download() {
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$2" "$1" 2> >(grep -v "^WARNING: Location" >&2)
}

# A wheel is a zip: rewrite it without the libraries for other CUDA/ROCm/XPU versions.
slim_bitsandbytes() {
  "$PY" - "$1" <<'EOF'
import re, sys, zipfile
from pathlib import Path
src = Path(sys.argv[1])
dst = src.with_name(src.name.replace("-py3-", "-1slim-py3-"))  # a build tag: still a wheel name
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda(?!130)\d+|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not drop.search(item.filename):
            zout.writestr(item, zin.read(item.filename))
src.unlink()
print(dst)
EOF
}

tree_b=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
tree_mib=$(( (tree_b + 1048575) / 1048576 ))
budget=$((64 - tree_mib))
printf '%-72s %6s  %-18s %s\n' wheel MiB path "fits beside the ${tree_mib} MiB tree (${budget} MiB left)"
total=0
for entry in "${wheels[@]}"; do
  read -r spec path where <<<"$entry"
  name=${spec%%==*}
  if ! download "$spec" "$where"; then
    printf '%-72s %6s  %-18s %s\n' "$spec" - "$path" "no wheel for cp312 manylinux x86_64"
    continue
  fi
  file=$(ls "$where"/"$(echo "$name" | tr - _)"-"${spec#*==}"-*.whl | grep -v 1slim | head -1)
  [ "$name" = bitsandbytes ] && file=$(slim_bitsandbytes "$file")
  size_b=$(stat -c %s "$file")
  size=$(awk "BEGIN{printf \"%.1f\", $size_b/1048576}")
  [ "$where" = "$dir" ] && total=$((total + size_b))
  fits=$(awk "BEGIN{print ($size_b/1048576 <= $budget) ? \"yes\" : \"NO\"}")
  printf '%-72s %6s  %-18s %s\n' "$(basename "$file")" "$size" "$path" "$fits"
done
# SmolLM2-135M's GGUF is 94 MB; its Q8_0 embedding alone ~30 MiB: the first 2 layers travel
# (scripts/smollm2_slice.py) with gguf in a second call, without $dir.
PY=$PY "$PY" scripts/smollm2_slice.py --layers 2 -o "$model_dir/smollm2-2l.gguf"
echo "in $model_dir (a second call): $(du -cb "$model_dir"/* | tail -1 | awk '{printf "%.1f", $1/1048576}') MiB + tree ${tree_mib} MiB of 64"
echo "in $dir (carried): $(awk "BEGIN{printf \"%.1f\", $total/1048576}") MiB + tree ${tree_mib} MiB of 64"
