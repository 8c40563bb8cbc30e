"""Loading the base a LoRA trains on: a float checkpoint, phitune's AWQ checkpoint, or nf4.

An AWQ base is loaded with phitune's own reader as frozen float weights equal to the
dequantized int4 values: exactly the function the 4-bit model computes, so the adapter learns
to compensate the quantization error, with plain PEFT LoRA on nn.Linear and no AWQ kernel
library (gptqmodel pins torch versions and latches inference-only kernels on CPU).
"""

from __future__ import annotations

from phitune.errors import DeviceError


def load_base(model_ref, method: str, device: str, dtype):
    if method == "qlora":
        if device != "cuda":
            raise DeviceError("--method qlora needs a CUDA GPU (bitsandbytes nf4)", "--method",
                              "use --method lora on CPU: on an AWQ base it trains on the 4-bit weights")
        return _load_nf4(model_ref.path, dtype)
    if model_ref.kind == "awq-model":
        from phitune.formats.awq_gemm import load_awq_dequantized
        model = load_awq_dequantized(model_ref.path, dtype)
    else:
        from phitune.models import load_causal_lm_lean
        model = load_causal_lm_lean(model_ref.path, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def _load_nf4(path, dtype):
    try:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DeviceError("--method qlora needs bitsandbytes", "--method",
                          "pip install 'phitune[cuda]'") from None
    from peft import prepare_model_for_kbit_training
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config,
                                                 dtype=dtype, device_map={"": 0},
                                                 attn_implementation="sdpa")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
