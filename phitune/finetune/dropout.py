"""LoRA's dropout with a mask drawn by its drops, not by its elements.

PEFT gives every LoRA projection an `nn.Dropout` on its input. On CPU its mask is the step's
costliest elementwise work: eager `bernoulli_` draws one random number per element, and
inductor's compiled dropout runs a whole Philox round per element inside the layer's kernel.
At LoRA's usual rates (0.05, 0.1) almost every element is kept, so here only the dropped
positions are drawn: the gaps between consecutive drops of i.i.d. Bernoulli(p) elements are
geometric, each one a uniform draw through the inverse CDF, so a mask costs ~p random numbers
per element instead of one. The same distribution, p exact; kept values are scaled by 1/(1-p)
as `nn.Dropout` does. Above `MAX_P` drawing gaps stops paying and PEFT's dropout stays.

Only on CPU: a GPU's dropout is one fused kernel already. The draw is a custom op: compiled
layers call it as it is (no graph break, no inductor RNG), so compiled and eager runs take their
masks from torch's generator alike and follow `torch.manual_seed`, the checkpointed RNG state
and resume. It is tagged as seeded-random so the compiler's partitioner saves its mask for
backward instead of drawing a new one; its `site` argument tells apart the projections that
read one input (q, k, v), which graph-level common-subexpression elimination would otherwise
give one shared mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_P = 0.2  # the gap draw beats a per-element draw while drops are rare
BATCH_MARGIN = 1.1  # gaps drawn per batch: the expected drops and a tenth more


@torch.library.custom_op("phitune::dropout_keep", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def dropout_keep(x: torch.Tensor, p: float, site: int) -> torch.Tensor:
    """A bool mask shaped like `x`, each element False with probability p, independently.
    `site` is not read: it keeps two call sites with the same input from being merged."""
    n = x.numel()
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    log_keep = math.log1p(-p)
    batch = int(n * p * BATCH_MARGIN) + 64
    last = -1  # the position of the last drop so far
    while True:
        uniform = 1.0 - torch.rand(batch, dtype=torch.float64, device=x.device)  # (0, 1]
        # P(gap >= k) = P(uniform <= (1-p)^k) = (1-p)^k: geometric kept-run lengths
        gaps = torch.floor(torch.log(uniform) / log_keep).to(torch.int64)
        drops = torch.cumsum(gaps + 1, 0) + last
        inside = drops[drops < n]
        keep[inside] = False
        if inside.numel() < batch:
            return keep.view(x.shape)
        last = int(drops[-1])


@dropout_keep.register_fake
def _(x: torch.Tensor, p: float, site: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool)


class LoraDropout(nn.Module):
    """`nn.Dropout(p)` for a LoRA input, its mask from `dropout_keep`."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p = p
        self.scale = 1.0 / (1.0 - p)
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * torch.ops.phitune.dropout_keep(x, self.p, self.site) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_lora_dropout(model) -> int:
    """Swap the CPU LoRA layers' `nn.Dropout`s (PEFT's) of 0 < p ≤ MAX_P for `LoraDropout`;
    the number swapped. On a GPU dropout is one fused kernel already, and the gap draw's
    data-dependent sizes would wait on the device at every call. Sites number the projection
    names, so every decoder layer's graph is the same."""
    swapped = 0
    sites: dict[str, int] = {}
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        if any(p.device.type != "cpu" for p in module.parameters()):
            continue
        site = sites.setdefault(name.rsplit(".", 1)[-1], len(sites))
        for adapter, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and 0 < dropout.p <= MAX_P:
                dropouts[adapter] = LoraDropout(dropout.p, site)
                swapped += 1
    return swapped
