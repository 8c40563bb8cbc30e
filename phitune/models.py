"""Loading checkpoints and tokenizers; device and dtype choice.

torch and transformers are imported inside functions so that the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path

from phitune.errors import DeviceError, InputError, UnsupportedModelError

# Architectures whose decoder layers phitune knows how to walk (quantize/arch.py).
SUPPORTED_ARCHITECTURES = ("Phi3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                           "Qwen2ForCausalLM")


def resolve_device(choice: str = "auto") -> str:
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible", "--device",
                          "use --device cpu or auto, or install a CUDA build of torch")
    return choice


def architecture(config: dict, path: Path | str) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch or 'unknown'} is not supported",
            f"{path}/config.json", f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def decoder_layers(model):
    """The repeated blocks (an nn.ModuleList) of a Hugging Face causal LM, PEFT-wrapped or not;
    None when the model keeps them elsewhere."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def load_causal_lm(path: Path | str, dtype=None, device: str = "cpu"):
    """A float causal LM in eval mode, with SDPA attention (causal without an explicit mask)."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or torch.float32, attn_implementation="sdpa",
            low_cpu_mem_usage=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model ({str(exc).splitlines()[0][:200]})", str(path),
                         "check that the directory holds a complete checkpoint") from None
    return model.to(device).eval()


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint dir, sharded (index) or not."""
    import json
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(file: Path):
    """Yield (name, tensor) from a .safetensors file with plain reads instead of mmap: pages of
    a mapped file count as this process's memory while it is open, which doubles a load's peak
    (file pages + the model's own copy)."""
    import json
    import struct

    import torch
    with open(file, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
            if end == begin:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            f.seek(8 + header_len + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def model_from_state(config, state: dict, dtype, where: str):
    """A causal LM built on the meta device and given `state`'s tensors (no second copy)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise InputError(f"the checkpoint lacks tensors: {', '.join(sorted(missing)[:3])}", where,
                         "check that the directory holds a complete checkpoint")
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    _materialize_buffers(model)
    return model.eval()


def _materialize_buffers(model) -> None:
    """Non-persistent buffers (rotary inv_freq) stay on meta after assign: rebuild those
    modules on the CPU from the config, which is how their constructors compute them."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, type(module)(config=module.config))


def load_causal_lm_lean(path: Path | str, dtype):
    """Like `load_causal_lm` for training bases: peak memory ≈ the model in `dtype`, read tensor
    by tensor without mapping the files."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model ({str(exc).splitlines()[0][:200]})", str(path),
                         "check that the directory holds a complete checkpoint") from None
    state = {}
    for file in safetensors_files(Path(path)):
        for name, tensor in read_safetensors(file):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not state:
        return load_causal_lm(path, dtype)  # .bin checkpoints: transformers' own loader
    return model_from_state(config, state, dtype, str(path))


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer ({str(exc).splitlines()[0][:200]})",
                         str(path), "the model directory needs its tokenizer files") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer and generation files travel with every model artifact."""
    import shutil
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
