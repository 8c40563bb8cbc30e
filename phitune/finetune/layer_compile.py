"""torch.compile for the decoder layers of a large model on CPU: inductor fuses the norms,
rotary, SiLU, dropout and LoRA scaling that run between the matmuls into a few kernels.

Measured on the Phi-3-mini shape (bf16, LoRA r=64, 512-token passes, in-process runs):
2 layers 193 → 238 tok/s (+23%), 8 layers 59 → 66 tok/s (+12%), peak memory 6% lower.
Compiling takes ~30 s on the first step (seconds once inductor's cache holds the graph), so
small models, whose runs are short, stay eager. Only the layers are compiled ("regional
compilation"): they share one graph, and the chunked loss stays as written.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import torch

from phitune.errors import first_line
from phitune.finetune.memory import Choice
from phitune.models import decoder_layers


def choose_compile(requested: bool | None, large: bool, device: str) -> Choice:
    """The user's choice; else on for large models on CPU when inductor can build a kernel
    here. CUDA stays eager unless asked: not measured there yet."""
    if requested is False:
        return Choice(False, "as asked")
    if requested is None and not large:
        return Choice(False, "small model")
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


def compile_layers(model) -> bool:
    """Compile each decoder layer in place (state dict names unchanged). A layer that fails to
    compile later runs eager instead of stopping training."""
    layers = decoder_layers(model)
    if layers is None:
        return False
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile()
    return True


@contextmanager
def eager():
    """Run compiled modules eagerly: eval runs a few no-grad passes, not worth a second graph."""
    with torch.compiler.set_stance("force_eager"):
        yield
