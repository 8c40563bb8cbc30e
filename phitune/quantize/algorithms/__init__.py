"""Quantization algorithms, one module each, keyed by `phitune quantize --algorithm`.

Each module defines `quantize_layer(layer, groups, inps, kwargs, cfg) -> (outputs, result)`,
run by quantize/driver.py on one decoder layer at a time: it leaves the layer's linears
holding their dequantized values and returns the layer's output (the next layer's input, or
None when the algorithm needs no calibration data) and {"packed": {name: tensors},
"alphas": {group: alpha}}.

Adding an algorithm (GPTQ, say) is one module here plus one line in ALGORITHMS below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from phitune.errors import OptionError
from phitune.quantize.algorithms import awq, rtn


@dataclass(frozen=True)
class Algorithm:
    name: str
    quantize_layer: Callable
    calibrated: bool   # needs calibration text (and with it the driver captures activations)
    # Entries added to the output's cache key: bump a search version there so that outputs
    # of an older search are not reused as up to date.
    key_params: dict = field(default_factory=dict)


ALGORITHMS: dict[str, Algorithm] = {
    "awq": Algorithm("awq", awq.quantize_layer, calibrated=True,
                     key_params={"awq_search": awq.SEARCH_VERSION}),
    "rtn": Algorithm("rtn", rtn.quantize_layer, calibrated=False),
}


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise OptionError(f"--algorithm {name} is not known", "--algorithm",
                          f"use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
