"""The AWQ search's elementwise work (the grids' fake quantization and clip error), written
once in torch and run eagerly or compiled by inductor (QuantConfig.compiled; the step turns
it on as compiling.choose_compile says).

Each grid step fake-quantizes whole weights: eager torch makes ~10 passes over memory per
weight, a compiled kernel one or two (figures in BENCHMARKS.md, "quantize").

- Compiled results are the eager ones: `emulate_precision_casts` keeps the scales' rounding
  to fp16 (without it inductor drops the to(fp16).to(fp32) round trip and 85% of the values
  move), and division stays division. Only the clip error's final sum runs in another order
  (relative differences ~4e-7).
- Only the rows dimension is dynamic (`mark_dynamic`): with every dimension symbolic, inductor
  spent over ten minutes in sympy simplifying the group views, and its kernels ran slower than
  eager. So there is one compile per group count (per input width: two for Phi-3), a few
  seconds each, less once inductor's on-disk cache holds them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from phitune.formats.awq_gemm import fake_quantize_


def scaled_fake_quantize(weight: torch.Tensor, s: torch.Tensor, bits: int, group_size: int,
                         zero_point: bool) -> torch.Tensor:
    """Q(w·s)/s in w's dtype, the weight a scale grid step measures: weight [out, groups, g],
    s [groups, g]."""
    return fake_quantize_(weight.float() * s, bits, group_size, zero_point).div_(s).to(weight.dtype)


def clip_error(weight: torch.Tensor, max_val: torch.Tensor, gram: torch.Tensor, bits: int,
               group_size: int, zero_point: bool) -> torch.Tensor:
    """Per group and row, the output error of the weight clipped at ±max_val, mean_t((Q(w') − w)·x_t)²
    = dᵀGd with G the input's Gram matrix: weight [groups, rows, g] fp32, max_val
    [groups, rows, 1], gram [groups, g, g]; returns [groups, rows, 1]."""
    d = fake_quantize_(torch.clamp(weight, -max_val, max_val), bits, group_size, zero_point).sub_(weight)
    return torch.bmm(d, gram).mul_(d).sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Kernels:
    scaled_fake_quantize: Callable[..., torch.Tensor]
    clip_error: Callable[..., torch.Tensor]


EAGER = Kernels(scaled_fake_quantize, clip_error)


def kernels(compiled: bool) -> Kernels:
    return _compiled() if compiled else EAGER


@functools.cache
def _compiled() -> Kernels:
    options = {"emulate_precision_casts": True}
    fake_quantized = torch.compile(scaled_fake_quantize, dynamic=False, options=options)
    clipped_error = torch.compile(clip_error, dynamic=False, options=options)

    def run_scaled_fake_quantize(weight, s, *args):
        torch._dynamo.mark_dynamic(weight, 0)
        return fake_quantized(weight, s, *args)

    def run_clip_error(weight, max_val, gram, *args):
        torch._dynamo.mark_dynamic(weight, 1)
        torch._dynamo.mark_dynamic(max_val, 1)
        return clipped_error(weight, max_val, gram, *args)

    return Kernels(run_scaled_fake_quantize, run_clip_error)
