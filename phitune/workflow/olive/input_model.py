"""The input model: `model_path` (or `hf_config.model_name`), and an input adapter, for the first
pass's `model`; loading keys phitune has no use for are noted.
"""

from __future__ import annotations

from typing import Any

from phitune.workflow.olive.tables import MODEL_LOADING_KEYS, MODEL_TYPES, TASKS
from phitune.workflow.olive.translation import Translation


def input_model(t: Translation) -> tuple[str, str | None]:
    im = t.raw.get("input_model")
    if not isinstance(im, dict):
        t.fail("input_model", "is missing or not a mapping",
               'add "input_model": {"type": "HfModel", "model_path": "tiny-phi3"}')
    kind = im.get("type")
    if kind not in MODEL_TYPES:
        t.fail("input_model.type", f"'{kind}' is not supported: phitune starts from a "
               "Hugging Face checkpoint", "use HfModel (or PyTorchModel with hf_config)")
    fields = t.fields(im, "input_model", skip=("type",))
    model = None
    adapter = None
    for key, (value, path) in fields.items():
        if key == "model_path":
            if isinstance(value, dict):
                inner = value.get("config", value)
                value = inner.get("path") if isinstance(inner, dict) else None
                if not isinstance(value, str):
                    t.fail(path, "names no local path", "write model_path: DIR or a hub id")
            model = value
        elif key == "hf_config" and isinstance(value, dict):
            for k, v in value.items():
                if k == "model_name":
                    model = model or v
                elif k in ("from_pretrained_args", "model_loading_args"):
                    _load_args(t, v, f"{path}.{k}")
                elif k == "task":
                    _task(t, v, f"{path}.task")
                else:
                    t.note(f"{path}.{k}")
        elif key in ("load_kwargs", "model_loading_args", "from_pretrained_args"):
            _load_args(t, value, path)
        elif key == "task":
            _task(t, value, path)
        elif key == "adapter_path":
            adapter = value
        elif key in MODEL_LOADING_KEYS:
            t.note(path, "not needed: phitune reads the checkpoint itself; not applied")
        else:
            t.note(path, "unknown key, not applied")
    if not model:
        t.fail("input_model", "names no model (model_path or hf_config.model_name)",
               'add "model_path": "tiny-phi3" (a directory, a hub id or the embedded model)')
    return str(model), adapter


def _load_args(t: Translation, args: Any, path: str) -> None:
    if not isinstance(args, dict):
        return t.note(path)
    for k in args:
        if k == "trust_remote_code":
            t.note(f"{path}.{k}", "not needed: phitune loads Phi-3 and Llama-style models "
                   "with transformers' own code; not applied")
        else:
            t.note(f"{path}.{k}")


def _task(t: Translation, task: Any, path: str) -> None:
    if task not in TASKS:
        t.note(path, f"'{task}': phitune builds causal LMs (text-generation); not applied")
