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
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in packed and leaf == "weight":
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


def _state_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def load_awq_dequantized(path: Path | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An AWQ checkpoint as a plain float model whose linear weights are the dequantized
    int4 values: phitune's own reference, independent of any AWQ kernel library."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, torch.Tensor]] = {}
    for file in _state_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                if leaf in ("qweight", "qzeros", "scales"):
                    quant.setdefault(module, {})[leaf] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key).to(dtype)
    for module, t in quant.items():
        state[f"{module}.weight"] = unpack_gemm(t["qweight"], t["qzeros"], t["scales"]).dequantize(dtype)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {sorted(missing)[:5]}")
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    _materialize_buffers(model, dtype)
    return model.eval()


def _materialize_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """Non-persistent buffers (rotary inv_freq) stay on meta after assign: rebuild those
    modules on the CPU from the config, which is how their constructors compute them."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(module)(config=module.config))
