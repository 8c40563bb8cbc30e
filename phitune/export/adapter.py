"""A PEFT LoRA adapter as an `.onnx_adapter` for a multi-LoRA graph.

Each graph slot gets A = [in, R] and B = [R, out] where R sums the ranks of the adapter
modules that write the slot's rows; B carries the LoRA scaling (alpha/r, or alpha/sqrt(r)
with rsLoRA) so the runtime only adds x @ A @ B. Everything that could not run — a module
the graph has no slot for, a shape that differs, DoRA, trained biases — is refused before
a byte is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phitune.errors import InputError
from phitune.export.slots import HF_MODULE_PIECES, Slot, piece_offsets
from phitune.models import check_safetensors, corrupt

_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_DTYPES = {"float": np.float32, "float16": np.float16, "bfloat16": np.float32}


@dataclass(eq=False)  # identity: the same module may feed several slots
class LoraModule:
    layer: int
    name: str            # Hugging Face module relative to its layer, e.g. self_attn.qkv_proj
    a: np.ndarray        # [r, in]
    b: np.ndarray        # [out, r], already multiplied by the scaling

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def read_peft_adapter(adapter_dir: Path) -> list[LoraModule]:
    """The LoRA modules of a PEFT adapter dir, scaling folded into B."""
    from safetensors.numpy import load_file
    adapter_dir = Path(adapter_dir)
    where = str(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise InputError(f"{adapter_dir} is not a PEFT adapter (needs adapter_config.json and "
                         "adapter_model.safetensors)", where,
                         "pass the adapter/ dir of a phitune finetune output or a PEFT save_pretrained dir")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise corrupt(config_file, f"not valid JSON ({str(exc)[:80]})") from None
    _refuse_unsupported(config, where)
    check_safetensors(weights)  # a truncated file is an error here, never a library traceback
    tensors = _load_float(load_file(str(weights)))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise InputError(f"the adapter trains '{key}', which is not a decoder-layer projection",
                             where, "only LoRA on attention/MLP projections can be served apart; "
                             "retrain without it in --target_modules")
        layer, module, ab = int(match[1]), match[2], match[3]
        if module not in HF_MODULE_PIECES:
            raise InputError(f"the adapter targets '{module}', which phitune cannot map onto the "
                             "ONNX graph", where, "target the attention/MLP projections only")
        pairs.setdefault((layer, module), {})[ab] = value
    modules = []
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InputError(f"layer {layer} {module} has lora_{'A' if 'A' in ab else 'B'} "
                             "without its pair", where, "the adapter file is incomplete")
        rank = ab["A"].shape[0]
        modules.append(LoraModule(layer, module, ab["A"],
                                  ab["B"] * _scaling(config, f"layers.{layer}.{module}", rank)))
    if not modules:
        raise InputError("the adapter holds no LoRA weights", where, "pass a trained adapter")
    return modules


def _load_float(tensors: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _refuse_unsupported(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"the adapter is {config.get('peft_type')}, not LoRA", where,
                         "only LoRA adapters can be served by onnxruntime-genai")
    if config.get("use_dora"):
        raise InputError("DoRA adapters cannot be served apart (their magnitude rescales the base "
                         "weight)", where, "merge it into the model (finetune --merge) or train plain LoRA")
    if config.get("bias", "none") != "none":
        raise InputError(f"the adapter trains biases (bias={config['bias']})", where,
                         "train with bias='none' to serve it as an .onnx_adapter")
    if config.get("modules_to_save"):
        raise InputError(f"the adapter also trains full modules {config['modules_to_save']}", where,
                         "only LoRA matrices can be served apart; merge instead")


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module) \
                or re.search(rf"(^|\.){key}$", module):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def slot_tensors(modules: list[LoraModule], slots: list[Slot], pieces: dict, dtype: str,
                 where: str) -> dict[str, np.ndarray]:
    """Graph-input name → array for every slot the adapter writes; refuses what doesn't fit."""
    by_slot = {(s.layer, s.name): s for s in slots}
    layers = 1 + max(s.layer for s in slots)
    covered: dict[tuple[int, str], list[tuple[LoraModule, str]]] = {}
    for module in modules:
        if module.layer >= layers:
            raise InputError(f"the adapter has layer {module.layer}; the model has {layers} layers",
                             where, "convert an adapter trained on this base model")
        hf_pieces = HF_MODULE_PIECES[module.name]
        expect_out = sum(pieces[p][0] for p in hf_pieces)
        expect_in = pieces[hf_pieces[0]][1]
        if module.b.shape[0] != expect_out or module.a.shape[1] != expect_in:
            raise InputError(f"layer {module.layer} {module.name} is {module.a.shape[1]}→"
                             f"{module.b.shape[0]} in the adapter but {expect_in}→{expect_out} "
                             "in the model", where, "the adapter was trained on another base model")
        for piece in hf_pieces:
            slot = next((s for (layer, _), s in by_slot.items()
                         if layer == module.layer and piece in s.pieces), None)
            if slot is None:
                raise InputError(f"the model graph has no LoRA input for layer {module.layer} "
                                 f"{module.name}", where, "re-run auto-opt (multi-LoRA on)")
            covered.setdefault((slot.layer, slot.name), []).append((module, piece))
    arrays: dict[str, np.ndarray] = {}
    np_dtype = _DTYPES.get(dtype, np.float32)
    for key, entries in covered.items():
        slot = by_slot[key]
        ranked = list(dict.fromkeys(m for m, _ in entries))  # modules in first-seen order
        rank = sum(m.rank for m in ranked)
        a = np.concatenate([m.a.T for m in ranked], axis=1)
        b = np.zeros((rank, slot.out_features), dtype=np.float32)
        slot_rows = piece_offsets(slot.pieces, pieces)
        col = 0
        for m in ranked:
            hf_rows = piece_offsets(HF_MODULE_PIECES[m.name], pieces)
            for module, piece in entries:
                if module is m:
                    (src, n), (dst, _) = hf_rows[piece], slot_rows[piece]
                    b[col:col + m.rank, dst:dst + n] = m.b[src:src + n].T
            col += m.rank
        arrays[slot.input_a] = np.ascontiguousarray(a, dtype=np_dtype)
        arrays[slot.input_b] = np.ascontiguousarray(b, dtype=np_dtype)
    return arrays


def write_onnx_adapter(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write with onnxruntime's AdapterFormat. It does not own the numpy buffers: `arrays`
    and the OrtValues must stay alive until export_adapter returns or the file holds garbage."""
    import onnxruntime as ort
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(values)
    adapter.export_adapter(str(path))
    del values


def convert(adapter_dir: Path, model_dir: Path, out_file: Path, layout=None) -> dict:
    """Check `adapter_dir` against the multi-LoRA graph in `model_dir` and write `out_file`."""
    from phitune.export.lora_graph import read_lora_layout
    layout = layout or read_lora_layout(model_dir)
    if layout is None:
        raise InputError(f"{model_dir} has no LoRA inputs", str(model_dir),
                         "re-run phitune auto-opt without --no-multi_lora")
    slots, pieces, dtype = layout
    modules = read_peft_adapter(adapter_dir)
    arrays = slot_tensors(modules, slots, pieces, dtype, str(adapter_dir))
    write_onnx_adapter(arrays, out_file)
    return {"adapter_modules": len(modules), "adapter_slots": len(arrays) // 2,
            "adapter_ranks": sorted({m.rank for m in modules})}
