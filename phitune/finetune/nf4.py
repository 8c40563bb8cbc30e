"""The QLoRA base: a float checkpoint quantized to bitsandbytes nf4 as it loads, on CPU or CUDA.

nf4 with double quantization (the QLoRA recipe); matmuls compute in the dtype policy.py picks
for training (bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere and below 64M
parameters). bitsandbytes ≥ 0.49 runs nf4 forward and backward on CPU with torch ops.

No network at run time: on import, bitsandbytes (on CPUs with AVX512-BF16) asks the `kernels`
library for a gemv kernel from a hub repository, which checks its publisher online and, offline,
fails with a warning after the attempt. That kernel serves only one-token inference, never
training, so phitune imports bitsandbytes with `kernels` hidden: no request is made, bitsandbytes
falls back to its own CPU ops as it does offline, and its one warning about it is filtered;
every other message of bitsandbytes' loggers still shows.
"""

from __future__ import annotations

import logging

from phitune.errors import DeviceError, OptionError

# What bitsandbytes logs when the hub kernel is not there (bitsandbytes/backends/cpu/ops.py).
_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_HUB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _HUB_KERNEL_MESSAGE not in record.getMessage()


def quiet_bitsandbytes() -> None:
    """Import bitsandbytes without the hub kernel request and its warning (idempotent)."""
    import sys
    if "bitsandbytes" in sys.modules:
        return
    logger = logging.getLogger(_HUB_KERNEL_LOGGER)
    if not any(isinstance(f, _DropHubKernelWarning) for f in logger.filters):
        logger.addFilter(_DropHubKernelWarning())
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    try:
        import bitsandbytes  # noqa: F401
    finally:
        if hidden is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


_ABSENT = object()


def load_nf4(model_ref, device: str, dtype):
    """The base with every linear layer but the LM head in nf4, ready for k-bit training."""
    if model_ref.kind == "awq-model":
        raise OptionError("--method qlora quantizes a float checkpoint to nf4; this is an AWQ "
                          "int4 checkpoint", str(model_ref.path),
                          "use --method lora on the AWQ base (it trains on its 4-bit weights), "
                          "or --method qlora on the float model it came from")
    import torch

    try:
        quiet_bitsandbytes()
    except ImportError:
        raise DeviceError("--method qlora needs bitsandbytes, which is not installed",
                          "--method", "reinstall phitune with scripts/install.sh (or pip "
                          "install 'bitsandbytes>=0.49')") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_ref.path), quantization_config=config, dtype=dtype,
        # this rank's GPU under torchrun (the step sets it before loading), not always GPU 0
        device_map={"": torch.cuda.current_device()} if device == "cuda" else "cpu",
        attn_implementation="sdpa")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
