"""Which dtype a step computes in, decided in one place for quantize, finetune and eval.

- finetune (`train_dtype`): fp32 for small models (exact; tests compare bit for bit); from
  SPEED_FROM_PARAMS on, bf16 on CUDA (fp16 without bf16) and on CPUs with native bf16 matmul
  (AVX512-BF16 / AMX), else fp32. Size is counted in parameters as the model computes, so an
  AWQ checkpoint (int4 on disk, dequantized to float for training) is as large as its source.
- eval (`eval_dtype`): the dtype finetune trained in when the model is a finetune output (its
  manifest says), so eval reproduces finetune's loss; otherwise finetune's rule.
- quantize (`calibration_dtype`): fp32 for small models (an exact search; tests compare bit
  for bit). On CPUs with native bf16 matmul, bf16 from SPEED_FROM_PARAMS on, like finetune: the
  search is matmul-bound and bf16 runs it several times faster there, with no loss of quality
  (figures in BENCHMARKS.md, "quantize"). Elsewhere fp32 below QUANTIZE_LEAN_FROM_PARAMS, and
  above it the half type the hardware is fast at: bf16 on CPU, the model's own half type on CUDA.
An explicit --dtype always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# From this many parameters, auto settings choose speed over bit-exactness: finetune and eval
# pick a half type where the hardware is fast at it, finetune compiles, frees activations to the
# OS and weighs checkpointing, quantize searches in bf16 on bf16-capable CPUs. Below it all runs
# exact fp32 (tests compare bit for bit). 256 MB of fp32, the old on-disk threshold.
SPEED_FROM_PARAMS = 64_000_000
# From this many parameters quantize runs lean: --eval is off by default, the model loads in its
# own dtype, the search computes in a half type and compiles its kernels (below, compiling costs
# what it saves: SmolLM2-135M).
QUANTIZE_LEAN_FROM_PARAMS = 1_000_000_000
# finetune on an AWQ base: up to this many MB of float base weights (in the compute dtype) the
# base is dequantized once at load (--base_weights auto). A small model's passes are
# overhead-bound and its float base is small (SmolLM2-135M: 0.5 GB in fp32), where
# dequantizing each weight per matmul, forward and backward, costs time for little memory.
FLOAT_BASE_MAX_MB = 1024


@dataclass
class Choice:
    """A setting a step picks for the user (checkpointing, compile), and why: printed."""

    on: bool
    reason: str


def _explicit(choice: str):
    import torch
    return None if choice == "auto" else getattr(torch, choice)


def speed_first(path: Path) -> bool:
    """Whether the model is past SPEED_FROM_PARAMS (auto settings then favour speed)."""
    return parameter_count(path) >= SPEED_FROM_PARAMS


def parameter_count(path: Path) -> int:
    """Weights the model computes with, from its safetensors headers (no tensor is read); a
    checkpoint without safetensors (.bin) is sized as fp32 on disk; an AWQ checkpoint's packed
    tensors count the weights they stand for."""
    from math import prod

    from phitune.formats.awq_gemm import WEIGHTS_PER_ELEMENT
    from phitune.measure import dir_size_mb
    from phitune.models import check_safetensors, safetensors_files
    files = safetensors_files(Path(path).resolve())
    if not files:
        return int(dir_size_mb(Path(path).resolve()) * 2**20 / 4)
    total = 0
    for file in files:
        for name, info in check_safetensors(file)[1].items():
            total += prod(info["shape"]) * WEIGHTS_PER_ELEMENT.get(name.rsplit(".", 1)[-1], 1)
    return total


def cpu_has_fast_bf16() -> bool:
    import torch
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def train_dtype(path: Path, device: str, choice: str = "auto"):
    import torch
    explicit = _explicit(choice)
    if explicit is not None:
        return explicit
    if not speed_first(path):
        return torch.float32
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def eval_dtype(choice: str, path: Path, device: str, manifest: dict | None = None):
    import torch
    explicit = _explicit(choice)
    if explicit is not None:
        return explicit
    manifest = manifest or {}
    trained = (manifest.get("metrics") or {}).get("dtype") \
        if manifest.get("artifact") == "finetuned" else None
    if trained in ("float32", "bfloat16", "float16"):
        return getattr(torch, trained)
    return train_dtype(path, device)


def calibration_dtype(choice: str, n_params: int, device: str, model_dtype):
    import torch
    explicit = _explicit(choice)
    if explicit is not None:
        return explicit
    if n_params < SPEED_FROM_PARAMS:
        return torch.float32
    if device != "cuda" and cpu_has_fast_bf16():
        return torch.bfloat16
    if n_params < QUANTIZE_LEAN_FROM_PARAMS:
        return torch.float32
    if device == "cuda":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return torch.bfloat16


def base_weights(choice: str, n_params: int, dtype) -> Choice:
    """How finetune holds an AWQ base: the user's int4/float, else float when its float weights
    take at most FLOAT_BASE_MAX_MB in `dtype`, int4 (kept packed) above."""
    if choice != "auto":
        return Choice(choice == "int4", "as asked")
    mb = n_params * dtype.itemsize / 2**20
    if mb <= FLOAT_BASE_MAX_MB:
        return Choice(False, f"its float weights take {mb:.0f} MB")
    return Choice(True, f"its float weights would take {mb / 1024:.1f} GB")
