"""What a model input is: `ResolvedModel`, and a local dir's kind told from what it holds.

Kinds: `hf-model` (a Hugging Face checkpoint), `awq-model` (one quantized to AutoAWQ's GEMM
layout; another `quant_method` gives `<method>-model`), `finetuned` (a finetune output: its
PEFT adapter in D/adapter beside D/model) and `onnx-genai` (an onnxruntime-genai dir). A phitune
output says its kind in its manifest; a dir made elsewhere is told by its files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from phitune import inputfiles
from phitune.artifacts.manifest import content_digest, read_manifest
from phitune.errors import InputError

# Artifact kinds whose payload lives in a `model/` subdirectory (design.md layout).
NESTED_PAYLOAD = {"finetuned", "onnx-genai"}
# A finetune output D holds its PEFT adapter in D/adapter, beside D/model (finetune writes it;
# auto-opt and eval take it along when -m names D): `ResolvedModel.adapter` finds it.
FINETUNE_ADAPTER = "adapter"


@dataclass
class ResolvedModel:
    """What `-m` named: a local directory holding the payload, and its kind."""

    spec: str
    path: Path
    kind: str  # hf-model | awq-model | finetuned | onnx-genai | ...
    manifest: dict | None = None
    hub_id: str | None = None
    config: dict = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """What an output must not overwrite: the payload dir, and what -m named when it is a
        path (a finetune output D, whose model/ links elsewhere; a .gguf file)."""
        named = Path(self.spec).expanduser()
        return [self.path] + ([named] if self.hub_id is None and named.exists() else [])

    @property
    def adapter(self) -> Path | None:
        """The adapter dir beside a finetune output's model/ (not checked: callers say what is
        wrong with it in their own terms); None for other kinds."""
        return self.path.parent / FINETUNE_ADAPTER if self.kind == "finetuned" else None

    @property
    def digest(self) -> str:
        if self.manifest and self.manifest.get("key"):
            return self.manifest["key"]
        return content_digest(self.path)


def check_files_regular(directory: Path) -> None:
    """Every file of a model dir is a regular one: a FIFO tokenizer.json or genai_config.json
    would hang its reader, a link to /dev/zero fill memory (subdirectories are not entered)."""
    for entry in sorted(Path(directory).iterdir()):
        if not entry.is_dir():
            inputfiles.check_regular(entry, str(directory))


def read_dir(spec: str, path: Path) -> ResolvedModel:
    """The model an existing local path holds: a phitune output (or its model/), an
    onnxruntime-genai dir made elsewhere, or a Hugging Face checkpoint."""
    if path.is_file():
        raise InputError(f"{spec} is a file, not a model directory", "-m",
                         "pass the directory that holds config.json")
    check_files_regular(path)  # before telling the kind by which files are there
    manifest = read_manifest(path)
    if manifest and manifest.get("artifact") in NESTED_PAYLOAD:
        payload = path / "model"
        return ResolvedModel(spec, payload, manifest["artifact"], manifest,
                             config=read_config(payload))
    parent_manifest = read_manifest(path.parent)
    if path.name == "model" and parent_manifest and parent_manifest.get("artifact") in NESTED_PAYLOAD:
        return ResolvedModel(spec, path, parent_manifest["artifact"], parent_manifest,
                             config=read_config(path))
    if (path / "genai_config.json").is_file():  # an onnxruntime-genai dir made elsewhere
        return ResolvedModel(spec, path, "onnx-genai", manifest)
    config = read_config(path)
    if not config:
        found = sorted(p.name for p in path.iterdir())[:6]
        raise InputError(f"{spec} is not a model directory (no config.json; found: "
                         f"{', '.join(found) or 'nothing'})", "-m",
                         "pass a Hugging Face model directory or a phitune output directory")
    return ResolvedModel(spec, path, hf_kind(config), manifest, config=config)


def read_config(path: Path) -> dict:
    """A checkpoint's config.json ({} when there is none); a broken one is one line."""
    file = Path(path) / "config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(inputfiles.read_text(file, str(file), limit=inputfiles.CONFIG_LIMIT))
    except json.JSONDecodeError as exc:
        raise InputError(f"config.json is not valid JSON ({exc.msg}, line {exc.lineno})",
                         str(file), "repair or re-download the model") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"config.json is not UTF-8 text (byte {exc.start})", str(file),
                         "repair or re-download the model") from None


def hf_kind(config: dict) -> str:
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "awq":
        return "awq-model"
    return f"{quant['quant_method']}-model" if quant.get("quant_method") else "hf-model"
