"""Loading the base a LoRA trains on: a float checkpoint, phitune's AWQ checkpoint, or nf4
(`nf4.py`, --method qlora, on CPU or CUDA).

An AWQ base is loaded with phitune's own reader as frozen float weights equal to the
dequantized int4 values: exactly the function the 4-bit model computes, so the adapter learns
to compensate the quantization error, with plain PEFT LoRA on nn.Linear and no AWQ kernel
library (gptqmodel pins torch versions and latches inference-only kernels on CPU).
"""

from __future__ import annotations


def load_base(model_ref, method: str, device: str, dtype):
    if method == "qlora":
        from phitune.finetune.nf4 import load_nf4
        return load_nf4(model_ref, device, dtype)
    if model_ref.kind == "awq-model":
        from phitune.formats.awq_gemm import load_awq_dequantized
        model = load_awq_dequantized(model_ref.path, dtype)
    else:
        from phitune.models import load_causal_lm_lean
        model = load_causal_lm_lean(model_ref.path, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)

