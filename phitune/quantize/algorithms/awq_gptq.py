"""AWQ + GPTQ: AWQ's per-channel scale search and folding (algorithms/awq.py), then GPTQ's
rounding with error feedback (algorithms/gptq.py) in place of AWQ's clip search and
round-to-nearest.

The two address different errors: AWQ's scales give the salient input channels more of the
int4 grid; GPTQ then compensates each column's rounding error on the columns not yet rounded,
through the Hessian of the layer's (scaled) inputs. The AWQ paper reports them complementary
(arXiv 2306.00978, table 6). The scale search still measures candidates with round-to-nearest
(what AutoAWQ does before a GPTQ pass too): scoring each of its ~9 candidates with GPTQ would
cost 9 GPTQ passes per group.
"""

from __future__ import annotations

import torch
from torch import nn

from phitune.quantize.algorithms import awq, gptq
from phitune.quantize.arch import ScaleGroup
from phitune.quantize.driver import QuantConfig

# Bump with either half's choices (enters the key as awq_gptq_search).
SEARCH_VERSION = f"{awq.SEARCH_VERSION}.{gptq.SEARCH_VERSION}"


@torch.no_grad()
def quantize_layer(layer: nn.Module, groups: list[ScaleGroup], inps: torch.Tensor, kwargs: dict,
                   cfg: QuantConfig) -> tuple[torch.Tensor, dict]:
    """Scale search on the float layer, scales folded, then the GPTQ forward: its output (the
    quantized layer's) is the next layer's input."""
    caught = awq.capture(layer, groups, inps, kwargs, cfg)
    best = [(g, *awq.search_scale(g, caught.inputs[g.name], cfg, caught.sample_inputs[g.name],
                                  caught.references[g.name]))
            for g in groups]
    alphas = {}
    for group, s, alpha in best:
        awq.apply_scale(group, s, caught.inputs[group.name])
        alphas[group.name] = alpha
    del caught, best
    outs, packed = gptq.round_layer(layer, inps, kwargs, cfg, groups)
    return outs, {"packed": packed, "alphas": alphas}
