"""Round-to-nearest: every weight to its group's nearest int4 level, no calibration."""

from __future__ import annotations

from torch import nn

from phitune.quantize.driver import QuantConfig, pack_layer


def quantize_layer(layer: nn.Module, groups: list, inps, kwargs: dict,
                   cfg: QuantConfig) -> tuple[None, dict]:
    return None, {"packed": pack_layer(layer, cfg), "alphas": {}}
