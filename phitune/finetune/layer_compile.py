"""torch.compile for the decoder layers of a large model on CPU: inductor fuses the norms,
rotary, SiLU, dropout and LoRA scaling that run between the matmuls into a few kernels (the
dropout mask itself comes from `dropout.py`'s custom op, not inductor's per-element RNG).

Compiling takes tens of seconds on the first step (seconds once inductor's cache holds the
graph), so small models, whose runs are short, stay eager (BENCHMARKS.md has the figures). Only
the layers are compiled ("regional compilation"): they share one graph, and the chunked loss
stays as written.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from phitune.models import decoder_layers


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
