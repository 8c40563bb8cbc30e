"""Quantization algorithms, one module each, keyed by `phitune quantize --algorithm`.

Each module defines `quantize_layer(layer, groups, inps, kwargs, cfg) -> (outputs, result)`,
run by quantize/driver.py on one decoder layer at a time: it leaves the layer's linears
holding their dequantized values and returns the layer's output (the next layer's input, or
None when the algorithm needs no calibration data) and {"packed": {name: tensors},
"alphas": {group: alpha}}. A module whose search can change sets `SEARCH_VERSION`, which
goes into every output's cache key as `<name>_search`: bump it and older outputs go stale.

Adding an algorithm is one module here plus one line in ALGORITHMS below; the
`--algorithm` choices and help come from that table. This file imports no algorithm module
(nor torch): `phitune quantize --help` reads the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from phitune.errors import OptionError


@dataclass(frozen=True)
class Algorithm:
    name: str          # the --algorithm value, and the module phitune.quantize.algorithms.<name>
    summary: str       # its part of --algorithm's help
    calibrated: bool   # needs calibration text (and with it the driver captures activations)
    searches: bool = False  # runs quantize/kernels.py's search kernels, compiled when chosen

    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")

    @property
    def quantize_layer(self) -> Callable:
        return self.module().quantize_layer

    @property
    def key_params(self) -> dict:
        """Entries added to the output's cache key, so that outputs of an older search are
        not reused as up to date."""
        version = getattr(self.module(), "SEARCH_VERSION", None)
        return {} if version is None else {f"{self.name}_search": version}


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("awq", "activation-aware scale + clip search", calibrated=True, searches=True),
    Algorithm("rtn", "plain round-to-nearest baseline", calibrated=False),
    Algorithm("gptq", "Hessian-based rounding with error feedback (GPTQ)", calibrated=True),
    Algorithm("awq_gptq", "AWQ's scale search, then GPTQ's rounding in place of clip + "
              "round-to-nearest", calibrated=True, searches=True),
)}


def help_text() -> str:
    """`--algorithm`'s help: each algorithm's name and summary."""
    return "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values()) + "."


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise OptionError(f"--algorithm {name} is not known", "--algorithm",
                          f"use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
