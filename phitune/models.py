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
