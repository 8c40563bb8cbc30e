"""A GGUF file as a model input: dequantized once into a Hugging Face checkpoint dir.

Every step reads Hugging Face checkpoints, so `-m FILE.gguf` is converted once (transformers
reads GGUF and dequantizes it to float) into `<cache>/gguf/gguf-<key>/`: config.json,
model.safetensors, tokenizer files with the chat template, generation_config.json and a
`phitune.json` manifest. The key is the sha256 of the file's bytes, so a second run, from any
path or name of the same file, reuses the conversion. `<cache>` is $PHITUNE_CACHE, else
$XDG_CACHE_HOME/phitune, else ~/.cache/phitune; `phitune cache ls|clean --gguf` manages it.

The conversion is published as every step's output is (output.py: staged in a hidden dir,
swapped into place when complete), so a killed conversion never leaves a dir that looks done. Files transformers could not read, or
would read wrongly (zeros for missing bytes), are refused first with one line: a wrong magic,
tensor data past the end of the file, a LoRA adapter, an architecture it has no GGUF reader for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from phitune import inputfiles, ui
from phitune.artifacts.manifest import make_key
from phitune.artifacts.output import Output
from phitune.errors import InputError, first_line

ENTRY_PREFIX = "gguf-"  # entries are `gguf-<16 hex>`: the shape `phitune cache` lists
_MAGIC = b"GGUF"
_FP32_LIMIT = 2_000_000_000  # parameters; above, the dequantized weights are kept in bf16
_FIX_FILE = "re-download or re-copy the file (its size or bytes are not a complete GGUF)"


def cache_root() -> Path:
    if os.environ.get("PHITUNE_CACHE"):
        return Path(os.environ["PHITUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "phitune"


def conversions_dir() -> Path:
    return cache_root() / "gguf"


def file_sha256(file: Path) -> str:
    with open(file, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def conversion_key(sha256: str) -> str:
    return make_key("gguf", {"gguf_sha256": sha256}, {})


def hf_dir(file: Path, spec: str | None = None) -> Path:
    """The Hugging Face checkpoint dir holding `file`'s model, converting it on first use."""
    file = Path(file)
    spec = spec or str(file)
    if not file.exists():
        raise InputError(f"{spec} is not a file", "-m", "pass the path of a .gguf model file")
    inputfiles.check_regular(file, "-m")
    _check_magic(file, spec)
    sha = file_sha256(file)
    key = conversion_key(sha)
    # published like any step's output, under a key of the file's bytes alone
    out = Output(conversions_dir() / f"{ENTRY_PREFIX}{key[:16]}", "hf-model", "gguf",
                 {"gguf": str(file.resolve()), "spec": spec, "gguf_sha256": sha}, {},
                 key=key, shared=True)
    if (out.existing() or {}).get("key") == key:
        os.utime(out.path)  # last use, for `phitune cache clean --older-than`
        return out.path
    info = inspect(file, spec)
    _make_cache(out.path.parent)
    # a full disk mid-conversion keeps the line it had before conversions were Outputs
    with out.staging(name_output=False) as work:
        ui.info(f"converting {spec} ({info['architecture']}, {file.stat().st_size / 2**20:.0f} MB "
                f"GGUF) into a Hugging Face checkpoint in {out.path} (once)")
        start = time.perf_counter()
        dtype = _convert(file, work, info)
        out.publish(work, {"architecture": info["architecture"], "dtype": dtype,
                           "params_m": round(info["params"] / 1e6, 2),
                           "gguf_mb": round(file.stat().st_size / 2**20, 1),
                           "seconds": round(time.perf_counter() - start, 1)})
    return out.path


def _make_cache(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the GGUF conversion cache {root} ({exc.strerror})",
                         "-m", "set PHITUNE_CACHE to a writable directory") from None


def _check_magic(file: Path, spec: str) -> None:
    with open(file, "rb") as fh:
        magic = fh.read(4)
    if magic != _MAGIC:
        raise InputError(f"{spec} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                         "-m", _FIX_FILE)


def inspect(file: Path, spec: str) -> dict:
    """What the header says, after checking that transformers can read the file as a model."""
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(file))
    except Exception as exc:  # the reader fails in many ways on cut or damaged files
        raise InputError(f"{spec} is a truncated or corrupt GGUF file ({type(exc).__name__}: "
                         f"{first_line(exc, 120, 'unreadable')})",
                         "-m", _FIX_FILE) from None
    size = file.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:  # missing bytes would otherwise read as zeros, or not at all
        raise InputError(f"{spec} is truncated: its tensors end at byte {end:,}, the file has "
                         f"{size:,}", "-m", _FIX_FILE)
    kind = _field(reader, "general.type") or "model"
    if kind != "model":
        what = f"a {_field(reader, 'adapter.type') or ''} adapter".replace("  ", " ")
        raise InputError(f"{spec} is {what} in GGUF (general.type {kind}), not a model", "-m",
                         "pass the base model's .gguf; phitune finetune trains PEFT LoRA "
                         "adapters on it")
    arch = _field(reader, "general.architecture")
    readable = _transformers_gguf_architectures()
    if arch not in readable:
        raise InputError(f"{spec} holds a '{arch}' model, which transformers cannot read from "
                         "GGUF", "-m", f"transformers reads GGUF for: {', '.join(readable)}; "
                                       "pass a Hugging Face checkpoint of this model instead")
    params = sum(int(t.n_elements) for t in reader.tensors)
    return {"architecture": arch, "params": params}


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    value = field.contents()
    return value if not isinstance(value, bytes) else value.decode("utf-8", "replace")


def _transformers_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _convert(file: Path, work: Path, info: dict) -> str:
    """transformers dequantizes the file; save it as a plain float checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Read from a dir holding only the file: from_pretrained(dir, gguf_file=) would also
    # pick up a config.json or tokenizer files lying beside it.
    source = work / ".source"
    source.mkdir()
    (source / "model.gguf").symlink_to(file.resolve())
    dtype = torch.float32 if info["params"] < _FP32_LIMIT else torch.bfloat16
    bars = hf_logging.is_progress_bar_enabled()
    if not ui.verbose():
        hf_logging.disable_progress_bar()  # per-tensor bars; phitune said what it is doing
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file="model.gguf")
        model, loaded = AutoModelForCausalLM.from_pretrained(
            str(source), gguf_file="model.gguf", dtype=dtype, output_loading_info=True)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as exc:
        raise InputError(f"transformers cannot read {file} ({type(exc).__name__}: "
                         f"{first_line(exc, 160, '')})", "-m",
                         "pass a Hugging Face checkpoint of this model instead") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    from phitune.checkpoint import check_loading_info
    check_loading_info(loaded, len(model.state_dict()), file)  # a random weight is never cached
    # The loaded model still says it is GGUF-quantized, and save_pretrained refuses such a
    # model ("not serializable"): its weights are plain float now, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # transformers leaves it None
    model.save_pretrained(str(work))  # tied embeddings stay tied: lm_head is not written
    tokenizer.save_pretrained(str(work))
    _template_into_tokenizer_config(work)
    shutil.rmtree(source)
    return str(dtype).removeprefix("torch.")


def _template_into_tokenizer_config(work: Path) -> None:
    """Keep the chat template in tokenizer_config.json, where onnxruntime-genai's tokenizer
    and every older reader look, rather than only in transformers 5's chat_template.jinja."""
    jinja = work / "chat_template.jinja"
    config_file = work / "tokenizer_config.json"
    if not jinja.is_file() or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config.setdefault("chat_template", jinja.read_text())
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    jinja.unlink()
