"""`-m SPEC` → a local model dir of a kind the step reads (`resolve_model`).

A spec is tried as, in order: an embedded name (embedded.py), a .gguf file (converted once
into a cached Hugging Face dir: gguf.py), an existing path (`-m D` and `-m D/model` both work:
kinds.py tells what it holds), and only then a hub id, so a path that exists is never taken for
one. A model of a kind the step does not read is refused with how to get one it does, and
every model that resolves has whole files (payload.py) before any reader opens them.
"""

from __future__ import annotations

import re
from pathlib import Path

from phitune import inputfiles
from phitune.artifacts import gguf
from phitune.artifacts.embedded import EMBEDDED_MODELS, EMBEDDED_NAMES, embedded_path
from phitune.artifacts.kinds import ResolvedModel, hf_kind, read_config, read_dir
from phitune.artifacts.manifest import read_manifest
from phitune.artifacts.payload import check_payload
from phitune.errors import InputError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KIND_NAMES = {"hf-model": "a Hugging Face model", "awq-model": "an AWQ-quantized model",
               "finetuned": "a phitune finetune output", "onnx-genai": "an onnxruntime-genai model"}


def resolve_model(spec: str, accept: tuple[str, ...], step: str) -> ResolvedModel:
    """Turn `-m SPEC` into a local model directory of one of the `accept`ed kinds."""
    if spec in EMBEDDED_MODELS:
        path = embedded_path(spec)
        if path.is_file():
            return _from_gguf(spec, path, accept, step)
        return _check_kind(read_dir(spec, path), accept, step)
    path = Path(spec).expanduser()
    if not path.is_dir():  # a FIFO or /dev/zero (behind a link or not): refused before reading
        inputfiles.check_regular(path, f"-m of phitune {step}")
    if path.is_file() and _is_gguf_file(path):
        return _from_gguf(spec, path, accept, step)
    if path.exists():
        return _check_kind(read_dir(spec, path), accept, step)
    if _looks_like_hub_id(spec):
        return _check_kind(_from_hub(spec), accept, step)
    near = _nearest_existing_parent(path)
    raise InputError(f"no such model {'file' if path.suffix.lower() == '.gguf' else 'directory'}"
                     f": {spec}", f"-m of phitune {step}",
                     f"check the path ({near} exists)" if near else
                     "pass a model directory, a .gguf file, a hub id such as "
                     f"microsoft/Phi-3.5-mini-instruct, or {EMBEDDED_NAMES}")


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _from_gguf(spec: str, file: Path, accept: tuple[str, ...], step: str) -> ResolvedModel:
    """A GGUF file, as the Hugging Face checkpoint it converts into (once: see gguf.py)."""
    if "hf-model" not in accept:  # refuse before a conversion that could not be used
        return _check_kind(ResolvedModel(spec, file, "hf-model"), accept, step)
    path = gguf.hf_dir(file, spec)
    config = read_config(path)
    return _check_kind(ResolvedModel(spec, path, hf_kind(config), read_manifest(path),
                                     config=config), accept, step)


def _looks_like_hub_id(spec: str) -> bool:
    if not _HUB_ID.match(spec):
        return False
    return not Path(spec.split("/")[0]).exists()  # `models/x` with models/ present is a path typo


def _nearest_existing_parent(path: Path) -> Path | None:
    for parent in path.parents:
        if str(parent) not in ("", ".") and parent.exists():
            return parent
    return None


def _from_hub(repo_id: str) -> ResolvedModel:
    """Fetch (or find in the local cache) a hub checkpoint."""
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                           "*.txt", "*.py", "*.jinja"])
    except Exception as exc:  # offline, unknown repo, gated: all user-fixable
        reason = first_line(exc, 240, "unknown error", sentence=True)
        raise InputError(f"cannot fetch '{repo_id}' from the Hugging Face hub ({reason})", "-m",
                         "check the id and the network, or pass a local model directory "
                         f"or {EMBEDDED_NAMES}") from None
    path = Path(local)
    config = read_config(path)
    return ResolvedModel(repo_id, path, hf_kind(config), hub_id=repo_id, config=config)


def _check_kind(model: ResolvedModel, accept: tuple[str, ...], step: str) -> ResolvedModel:
    if model.kind not in accept:
        wanted = " or ".join(_KIND_NAMES.get(k, k) for k in accept)
        raise InputError(f"{model.spec} is {_KIND_NAMES.get(model.kind, model.kind)}; "
                         f"phitune {step} needs {wanted}", _model_option(step),
                         _kind_fix(model, accept, step))
    check_payload(model)
    return model


def _model_option(step: str) -> str:
    """The option that names the model: export-adapter calls it --base."""
    return "--base" if step == "export-adapter" else "-m"


def _kind_fix(model: ResolvedModel, accept: tuple[str, ...], step: str) -> str:
    """How to get a model the step reads from the one given."""
    if accept == ("onnx-genai",) and model.kind in ("hf-model", "awq-model", "finetuned"):
        return (f"export it first: phitune auto-opt -m {model.spec} -o D, then phitune {step} "
                f"{_model_option(step)} D")
    if model.kind == "onnx-genai":
        return "pass the Hugging Face or phitune checkpoint it was exported from"
    if model.kind == "awq-model" and step == "quantize":
        return "it is already quantized: pass it to phitune finetune or auto-opt"
    return "pass a model of the expected kind"
