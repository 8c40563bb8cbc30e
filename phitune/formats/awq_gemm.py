"""The AutoAWQ "GEMM" checkpoint format: group-wise int4 weights, their packed layout, and
writing/reading whole checkpoints in it (every reader imports it from here, not from quantize/).

The layout is what transformers (through gptqmodel) and onnxruntime-genai's model builder
read, so checkpoints need no phitune code:

    qweight [in, out/8]   int32, 8 nibbles per int in AWQ order 0,2,4,6,1,3,5,7
    qzeros  [in/g, out/8] int32, same packing
    scales  [in/g, out]   fp16

Symmetric quantization (no zero point) is stored in the same layout with a constant zero
of 2**(bits-1), so every reader dequantizes it as (q - z) * scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int holds column AWQ_ORDER[i]
PACK = 8  # 32 bits / 4 bits
# How many of the model's weights one stored element of each GEMM tensor stands for: a qweight
# int32 packs PACK of them; qzeros and scales are bookkeeping (policy.parameter_count).
WEIGHTS_PER_ELEMENT = {"qweight": PACK, "qzeros": 0, "scales": 0}


@dataclass
class QuantizedWeight:
    """A weight as integers plus per-group scales and zeros, all [out, ...] row-major."""

    intweight: torch.Tensor  # [out, in] uint8 in [0, 2**bits)
    scales: torch.Tensor     # [out, in/g] fp16
    zeros: torch.Tensor      # [out, in/g] uint8
    group_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out_f, in_f = self.intweight.shape
        g = self.group_size
        q = self.intweight.view(out_f, in_f // g, g).to(torch.float32)
        w = (q - self.zeros.to(torch.float32).unsqueeze(-1)) * self.scales.to(torch.float32).unsqueeze(-1)
        return w.view(out_f, in_f).to(dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> QuantizedWeight:
    """Round-to-nearest group quantization of `w` [out, in]; scales rounded to fp16 first so the
    stored checkpoint dequantizes to exactly what was measured."""
    out_f, in_f = w.shape
    wg = w.detach().to(torch.float32).reshape(-1, group_size)
    max_int = 2**bits - 1
    if zero_point:
        max_val, min_val = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
        scales = ((max_val - min_val).clamp(min=1e-5) / max_int).half().float()
        zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = (wg.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / (half - 1)).half().float()
        zeros = torch.full_like(scales, float(half))
    q = (torch.round(wg / scales) + zeros).clamp(0, max_int)
    groups = in_f // group_size
    return QuantizedWeight(q.to(torch.uint8).view(out_f, in_f), scales.view(out_f, groups).half(),
                           zeros.to(torch.uint8).view(out_f, groups), group_size)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """Quantize then dequantize, in `w`'s dtype: what the layer computes after quantization."""
    return fake_quantize_(w.detach().to(torch.float32, copy=True), bits, group_size,
                          zero_point).to(w.dtype)


def fake_quantize_(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """`fake_quantize` in place on an fp32 tensor, bit for bit the same values as
    `quantize_weight(...).dequantize()` but without its uint8 round trip and temporaries
    (the AWQ grids call it tens of times per weight: it was a third of a layer's search)."""
    shape = w.shape
    wg = w.view(-1, group_size)
    max_int = 2**bits - 1
    if zero_point:
        max_val, min_val = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
        scales = ((max_val - min_val).clamp_(min=1e-5) / max_int).half().float()
        zeros = min_val.div_(scales).round_().neg_().clamp_(0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = (wg.abs().amax(dim=1, keepdim=True).clamp_(min=1e-5) / (half - 1)).half().float()
        zeros = torch.full_like(scales, float(half))
    wg.div_(scales).round_().add_(zeros).clamp_(0, max_int).sub_(zeros).mul_(scales)
    return wg.view(shape)


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in [0, 16) → [rows, cols/8] int32 in AWQ nibble order."""
    rows, cols = values.shape
    # In int32 throughout (half the memory traffic of int64): the top nibble's shift wraps
    # into the sign bit, which is the two's-complement int32 the layout stores.
    v = values.to(torch.int32).view(rows, cols // PACK, PACK)
    packed = v[:, :, AWQ_ORDER[0]].clone()
    for i, col in enumerate(AWQ_ORDER[1:], 1):
        packed |= v[:, :, col] << (4 * i)
    return packed


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    rows, cols = packed.shape
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(rows, cols, PACK, dtype=torch.uint8, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((p >> (4 * i)) & 0xF).to(torch.uint8)
    return out.view(rows, cols * PACK)


def pack_gemm(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The three tensors of an AutoAWQ GEMM linear."""
    return {
        "qweight": _pack_columns(qw.intweight.t().contiguous()),
        "qzeros": _pack_columns(qw.zeros.t().contiguous()),
        "scales": qw.scales.t().contiguous().half(),
    }


def unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """Inverse of `pack_gemm`: phitune's own reader of AWQ checkpoints."""
    in_f = qweight.shape[0]
    groups = scales.shape[0]
    return QuantizedWeight(
        intweight=_unpack_columns(qweight).t().contiguous(),
        scales=scales.t().contiguous().half(),
        zeros=_unpack_columns(qzeros).t().contiguous(),
        group_size=in_f // groups,
    )


def quantization_config(bits: int, group_size: int, zero_point: bool,
                        algorithm: str | None = None) -> dict:
    """The config every reader keys on: `quant_method: awq` names the layout, not how the
    values were chosen. That goes in `meta` (transformers' GPTQConfig/AwqConfig field for
    "properties that do not contribute to quantization or inference", e.g. the quantizer):
    `meta.algorithm` says which algorithm made them (rtn, awq, gptq, awq_gptq)."""
    config = {"quant_method": "awq", "bits": bits, "group_size": group_size,
              "zero_point": zero_point, "version": "gemm", "modules_to_not_convert": None}
    if algorithm is not None:
        from phitune import __version__
        config["meta"] = {"quantizer": [f"phitune:{__version__}"], "algorithm": algorithm}
    return config


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


def read_awq_checkpoint(path: Path | str, dtype: torch.dtype, on_complete=None):
    """(config without its quantization_config, every unquantized tensor in `dtype`, the
    packed qweight/qzeros/scales by module) of an AWQ checkpoint. `on_complete(state, module,
    tensors)` takes a module's packed tensors as soon as all three are read (they are then not
    kept in the third value), so a reader can turn them into floats one module at a time."""
    from transformers import AutoConfig

    from phitune.models import read_safetensors, safetensors_files
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, dict[str, torch.Tensor]] = {}
    for file in safetensors_files(Path(path)):
        for key, tensor in read_safetensors(file):
            module, _, leaf = key.rpartition(".")
            if leaf in ("qweight", "qzeros", "scales"):
                quant.setdefault(module, {})[leaf] = tensor
                if on_complete is not None and len(quant[module]) == 3:
                    on_complete(state, module, quant.pop(module))
            else:
                state[key] = tensor.to(dtype)
    return config, state, quant


def load_awq_dequantized(path: Path | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An AWQ checkpoint as a plain float model whose linear weights are the dequantized
    int4 values: phitune's own reference, independent of any AWQ kernel library."""
    from phitune.models import model_from_state

    def dequantize(state: dict, module: str, t: dict) -> None:  # as soon as a module is read
        state[f"{module}.weight"] = unpack_gemm(t["qweight"], t["qzeros"],
                                                t["scales"]).dequantize(dtype)
    config, state, _ = read_awq_checkpoint(path, dtype, dequantize)
    return model_from_state(config, state, dtype, str(path))
