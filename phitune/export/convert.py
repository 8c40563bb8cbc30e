"""Checkpoint rewrites that feed the model builder what it reads cheaply, tensor by tensor.

- float → int4: round-to-nearest into the AutoAWQ GEMM layout. The builder reads that
  layout directly into MatMulNBits, whereas its own int4 path holds the whole fp32 graph
  (~27.6 GB for Phi-3-mini). Streaming one tensor at a time keeps peak memory to the int4
  model plus one float weight.
- AWQ → float: the dequantized int4 weights, for an fp32/fp16 export that computes exactly
  what the AWQ model computes (what `phitune finetune` trained the adapter on).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from phitune.errors import OptionError
from phitune.export.slots import HF_MODULE_PIECES
from phitune.models import copy_tokenizer_files, read_safetensors, safetensors_files
from phitune.formats.awq_gemm import pack_gemm, quantization_config, quantize_weight, unpack_gemm

_PROJECTION = re.compile(r"^model\.layers\.\d+\.(\w+\.\w+)\.weight$")
_SHARD_BYTES = 512 * 2**20  # bounded memory; the builder reads shards alike


def _tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(src):
        yield from read_safetensors(file)


class _ShardWriter:
    """Writes safetensors shards of ~512 MB plus the index, so memory stays bounded."""

    def __init__(self, dst: Path):
        self.dst, self.pending, self.size, self.shards = dst, {}, 0, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.dst / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.dst / self.shards[0][0]).rename(self.dst / "model.safetensors")
            return
        weight_map = {key: name for name, keys in self.shards for key in keys}
        (self.dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def _rewrite(src: Path, dst: Path, config: dict, tensor_fn: Callable) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(dst)
    for key, tensor in _tensors(src):
        for name, out in tensor_fn(key, tensor):
            writer.add(name, out)
    writer.close()
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer_files(src, dst)
    for extra in ("chat_template.jinja", "tokenizer.model"):
        if (src / extra).is_file():
            (dst / extra).write_bytes((src / extra).read_bytes())


def _rtn_pack(weight: torch.Tensor, block_size: int, rows: int = 1024) -> dict[str, torch.Tensor]:
    """Quantize and pack `rows` output channels at a time: the fp32 and int64 temporaries of a
    whole Phi-3-mini gate_up_proj would be gigabytes."""
    chunks = [pack_gemm(quantize_weight(weight[i:i + rows].float(), 4, block_size, zero_point=True))
              for i in range(0, weight.shape[0], rows)]
    return {leaf: torch.cat([c[leaf] for c in chunks], dim=1) for leaf in chunks[0]}


def float_to_int4(src: Path, dst: Path, config: dict, block_size: int) -> None:
    """Round-to-nearest int4 (asymmetric, one zero point per block) in the AWQ GEMM layout."""
    hidden = config["hidden_size"]
    if hidden % block_size or config["intermediate_size"] % block_size:
        raise OptionError(f"--block_size {block_size} does not divide the model's hidden size "
                          f"({hidden}) and intermediate size ({config['intermediate_size']})",
                          "phitune auto-opt", "use 32, 64 or 128")

    def tensor_fn(key: str, tensor: torch.Tensor):
        match = _PROJECTION.match(key)
        if match and match[1] in HF_MODULE_PIECES and tensor.dim() == 2:
            module = key[: -len(".weight")]
            return [(f"{module}.{leaf}", value) for leaf, value in _rtn_pack(tensor, block_size).items()]
        return [(key, tensor.to(torch.float16))]

    out_config = dict(config, quantization_config=quantization_config(4, block_size, True),
                      dtype="float16")
    out_config.pop("torch_dtype", None)
    _rewrite(src, dst, out_config, tensor_fn)


def awq_to_float(src: Path, dst: Path, config: dict, dtype: torch.dtype) -> None:
    """The AWQ checkpoint's dequantized weights as a plain float checkpoint."""
    parts: dict[str, dict[str, torch.Tensor]] = {}

    def tensor_fn(key: str, tensor: torch.Tensor):
        module, _, leaf = key.rpartition(".")
        if leaf not in ("qweight", "qzeros", "scales"):
            return [(key, tensor.to(dtype))]
        parts.setdefault(module, {})[leaf] = tensor
        if len(parts[module]) < 3:
            return []
        t = parts.pop(module)
        weight = unpack_gemm(t["qweight"], t["qzeros"], t["scales"]).dequantize(dtype)
        return [(f"{module}.weight", weight)]

    out_config = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    out_config["dtype"] = str(dtype).removeprefix("torch.")
    _rewrite(src, dst, out_config, tensor_fn)
