"""Loading the base a LoRA trains on: a float checkpoint, phitune's AWQ checkpoint, or nf4
(`nf4.py`, --method qlora, on CPU or CUDA).

An AWQ base is read with phitune's own reader and computes exactly the dequantized int4
values, so the adapter learns to compensate the quantization error, with PEFT's own LoRA layer
and no AWQ kernel library (gptqmodel pins torch versions and latches inference-only kernels on
CPU). By default its linears stay packed int4 (finetune/packed_awq.py: 4x less memory for the
base, each weight dequantized while its matmul runs); `base_weights="float"` dequantizes the
whole base once at load instead (more memory, no per-matmul dequantization).
"""

from __future__ import annotations


def load_base(model_ref, method: str, device: str, dtype, base_weights: str = "int4"):
    if method == "qlora":
        from phitune.finetune.nf4 import load_nf4
        return load_nf4(model_ref, device, dtype)
    if model_ref.kind == "awq-model" and base_weights == "int4":
        from phitune.finetune.packed_awq import load_awq_packed
        model = load_awq_packed(model_ref.path, dtype)
    elif model_ref.kind == "awq-model":
        from phitune.formats.awq_gemm import load_awq_dequantized
        model = load_awq_dequantized(model_ref.path, dtype)
    else:
        from phitune.models import load_causal_lm_lean
        model = load_causal_lm_lean(model_ref.path, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)

