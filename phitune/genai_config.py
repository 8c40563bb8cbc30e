"""Reading an onnxruntime-genai model dir's genai_config.json: one place, one clear error.

auto-opt, export-adapter, infer and eval all need a field or two of it (the decoder's file
name, the context length, the vocabulary size); a dir without a usable file is a user
mistake (wrong -m), so it ends in one InputError line, never a KeyError traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from phitune import inputfiles
from phitune.errors import InputError

FILE = "genai_config.json"
ADAPTER_FILE = "adapter_weights.onnx_adapter"  # the adapter auto-opt writes beside the graph
_REEXPORT = "re-export the model with phitune auto-opt"  # the fix for a broken config


def read(model_dir: Path) -> dict:
    """The whole config; InputError when the file is missing or is not a JSON object."""
    file = Path(model_dir) / FILE
    try:
        config = json.loads(inputfiles.read_text(file, str(file), limit=inputfiles.CONFIG_LIMIT))
    except FileNotFoundError:
        raise InputError(f"{model_dir} is not an onnxruntime-genai model (no {FILE})", "-m",
                         "export the model with phitune auto-opt first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {FILE} ({exc})", str(file),
                         _REEXPORT) from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"{FILE} has no 'model' section", str(file),
                         _REEXPORT)
    return config


def model_field(model_dir: Path, *keys: str):
    """config['model'][keys[0]][keys[1]]...; InputError naming the missing path."""
    value = read(model_dir)["model"]
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise InputError(f"{FILE} has no model.{'.'.join(keys)}", str(Path(model_dir) / FILE),
                             _REEXPORT)
        value = value[key]
    return value


def decoder(model_dir: Path) -> dict:
    section = model_field(model_dir, "decoder")
    if not isinstance(section, dict):
        raise InputError(f"{FILE}'s model.decoder is not an object", str(Path(model_dir) / FILE),
                         _REEXPORT)
    return section


def decoder_file(model_dir: Path) -> str:
    """The decoder graph's file name (model.onnx when the config leaves it out)."""
    return str(decoder(model_dir).get("filename", "model.onnx"))


def _positive_int(model_dir: Path, key: str) -> int:
    value = model_field(model_dir, key)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise InputError(f"{FILE}'s model.{key} is not a positive integer ({value!r})",
                         str(Path(model_dir) / FILE), _REEXPORT)
    return number


def context_length(model_dir: Path) -> int:
    return _positive_int(model_dir, "context_length")


def vocab_size(model_dir: Path) -> int:
    return _positive_int(model_dir, "vocab_size")


def min_kv_tokens(model_dir: Path) -> int:
    """The fewest tokens a KV cache of this graph may hold: its sliding window when any layer
    has one (Gemma 3; Qwen2 with use_sliding_window), else 0. onnxruntime's GroupQueryAttention
    refuses a smaller buffer ("KV cache capacity (12) must be at least local_window_size
    (64)"), so every place that sizes a cache — infer, serve, eval's scorer and latency,
    bench — sizes it to at least this, whatever the prompt and answer need."""
    window = decoder(model_dir).get("sliding_window")
    if not isinstance(window, dict) or window.get("layers") == []:
        return 0
    try:
        return max(int(window.get("window_size") or 0), 0)
    except (TypeError, ValueError):
        return 0


def kv_tokens(model_dir: Path, needed: int) -> int:
    """The KV cache length for `needed` tokens on this graph: at least its window."""
    return max(needed, min_kv_tokens(model_dir))
