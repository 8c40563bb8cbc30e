"""Writing and reading AWQ checkpoints in the AutoAWQ GEMM layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from phitune.quantize.pack import unpack_gemm


def quantization_config(bits: int, group_size: int, zero_point: bool) -> dict:
    return {"quant_method": "awq", "bits": bits, "group_size": group_size,
            "zero_point": zero_point, "version": "gemm", "modules_to_not_convert": None}


def save_awq_checkpoint(model: nn.Module, packed: dict, out_dir: Path, qconfig: dict,
                        max_shard_size: str = "2GB") -> None:
    """Quantized linears as qweight/qzeros/scales, every other tensor in fp16 (as AutoAWQ)."""
    from huggingface_hub import save_torch_state_dict
    state = {}
    # A tied LM head is the embedding: written once, as the original checkpoint has it.
    tied = "lm_head.weight" if getattr(model.config, "tie_word_embeddings", False) else None
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in packed and leaf == "weight" or name == tied:
            continue
        state[name] = tensor.detach().to(torch.float16).contiguous()
    for module, tensors in packed.items():
        for leaf, tensor in tensors.items():
            state[f"{module}.{leaf}"] = tensor.contiguous()
    save_torch_state_dict(state, str(out_dir), max_shard_size=max_shard_size)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_awq_dequantized(path: Path | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An AWQ checkpoint as a plain float model whose linear weights are the dequantized
    int4 values: phitune's own reference, independent of any AWQ kernel library."""
    from transformers import AutoConfig

    from phitune.models import model_from_state, read_safetensors, safetensors_files
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, torch.Tensor]] = {}
    for file in safetensors_files(path):
        for key, tensor in read_safetensors(file):
            module, _, leaf = key.rpartition(".")
            if leaf in ("qweight", "qzeros", "scales"):
                quant.setdefault(module, {})[leaf] = tensor
                if len(quant[module]) == 3:  # dequantize as soon as a module is complete
                    t = quant.pop(module)
                    state[f"{module}.weight"] = unpack_gemm(t["qweight"], t["qzeros"],
                                                            t["scales"]).dequantize(dtype)
            else:
                state[key] = tensor.to(dtype)
    return model_from_state(config, state, dtype, str(path))
