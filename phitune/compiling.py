"""Whether a step runs torch.compile: the user's --compile/--no-compile, else on for large
models on CPU where inductor can build a kernel. finetune compiles its decoder layers
(finetune/layer_compile.py), quantize its search's elementwise kernels (quantize/kernels.py)."""

from __future__ import annotations

import os
import shutil

import torch

from phitune.errors import first_line
from phitune.policy import Choice


def choose_compile(requested: bool | None, large: bool, device: str,
                   memory_first: bool = False) -> Choice:
    """The user's choice; else on for large models on CPU when inductor can build a kernel
    here, unless the caller saves memory first (`memory_first`: finetune on a base kept 4-bit,
    where a first, cold compile raises the peak by GBs: inductor builds its kernels in the
    process). CUDA stays eager unless asked: not measured there yet."""
    if requested is False:
        return Choice(False, "as asked")
    if requested is None and not large:
        return Choice(False, "small model")
    if requested is None and memory_first:
        return Choice(False, "the base is kept 4-bit to save memory, and compiling takes GBs "
                             "more at first; --compile to trade memory for speed")
    if requested is None and device != "cpu":
        return Choice(False, "not measured on this device; --compile to try")
    problem = _toolchain_problem(device)
    if problem:
        return Choice(False, problem)
    return Choice(True, "as asked" if requested else "large model on CPU")


def _toolchain_problem(device: str) -> str | None:
    """Why inductor cannot compile here, or None: builds one tiny kernel to find out."""
    if device == "cpu" and not cpu_compiler():
        return f"no C++ compiler ({_compiler_name()}) for torch.compile; set CXX"
    try:
        torch.compile(lambda x: (x * 2).sin(), dynamic=False)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means: stay eager
        return f"torch.compile failed here ({type(e).__name__}: {first_line(e, 120, '')})"
    return None


def _compiler_name() -> str:
    return os.environ.get("CXX") or "g++"  # what inductor runs on CPU


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would run on CPU, or None when it is not on PATH."""
    return shutil.which(_compiler_name())
