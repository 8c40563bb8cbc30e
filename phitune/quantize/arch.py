"""Where AWQ may move scale inside a decoder layer: the architecture table's scale groups
(phitune/architectures.py) bound to one layer's modules.

A scale group is an op that produces some channels (an RMSNorm, or rows of a linear) and
the linears that consume them. Dividing the producer by s and multiplying the consumers'
input columns by s leaves the layer's function unchanged, and lets salient input channels
keep more precision after rounding (AWQ, arXiv 2306.00978, section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from phitune.architectures import FUSED_PIECES, ScaleGroupSpec, family, piece_offsets, piece_sizes


@dataclass
class ScaleGroup:
    name: str
    prev: nn.Module                   # RMSNorm or Linear whose output channels are scaled by 1/s
    linears: list[nn.Linear]          # consumers whose input columns are scaled by s
    inspect: Callable[[torch.Tensor], torch.Tensor]  # forward whose output error is minimised
    inspect_module: nn.Module         # the module `inspect` calls (its output is the grid's reference)
    prev_rows: slice | None = None    # when prev is a fused linear, the rows feeding `linears`
    norm: str = "rms"                 # when prev is a norm: how it applies its weight (NORM_KINDS)
    kv_repeat: int = 1                # GQA: one scale per value channel, shared by kv_repeat heads
    head_dim: int = 1

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Scales over the producer's channels → scales over the consumers' input columns."""
        if self.kv_repeat == 1:
            return s
        return s.view(-1, 1, self.head_dim).expand(-1, self.kv_repeat, -1).reshape(-1)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Per-input-column statistics → per-producer-channel (mean over heads sharing a kv head)."""
        if self.kv_repeat == 1:
            return v
        return v.view(-1, self.kv_repeat, self.head_dim).mean(1).reshape(-1)


# Separate query/key projections are not clipped (AutoAWQ: their errors are amplified by the
# softmax). A fused qkv_proj is clipped, as AutoAWQ does for Phi-3: measured on tiny-phi3,
# clipping it cut the AWQ perplexity gap from 0.56 to 0.19 (RTN: 0.77).
NO_CLIP = ("q_proj", "k_proj")


def _attn_call(attn: nn.Module, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: attn(hidden_states=x, **kwargs)[0]


def _rows(spec: ScaleGroupSpec, config) -> slice | None:
    """The rows of a fused producer that feed the group (e.g. the v rows of qkv_proj)."""
    if spec.prev_piece is None:
        return None
    fused = FUSED_PIECES[spec.prev.rsplit(".", 1)[-1]]
    first, rows = piece_offsets(fused, piece_sizes(config.to_dict()))[spec.prev_piece]
    return slice(first, first + rows)


def scale_groups(arch: str, layer: nn.Module, config, attn_kwargs: dict) -> list[ScaleGroup]:
    """The layer's scale groups as its architecture's record (phitune/architectures.py) names them."""
    record = family(arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_repeat = config.num_attention_heads // n_kv
    groups = []
    for spec in record.scale_groups:
        module = layer.get_submodule(spec.inspect)
        inspect = _attn_call(module, attn_kwargs) if spec.inspect.endswith("self_attn") else module
        groups.append(ScaleGroup(
            spec.name, layer.get_submodule(spec.prev), [layer.get_submodule(n) for n in spec.linears],
            inspect, module, prev_rows=_rows(spec, config), norm=record.norm,
            kv_repeat=kv_repeat if spec.per_kv_head else 1,
            head_dim=head_dim if spec.per_kv_head else 1))
    return groups


def linear_names(layer: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
