"""The manifest every output carries, and the key it is filed under.

An output dir holds `phitune.json` next to what its step wrote; its `key` is a sha256 over
everything that shaped the output (step, inputs' digests, params, the tool version). artifacts'
`Output` writes it, GGUF conversions write their own, the workflow and `phitune cache` read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from phitune import __version__

MANIFEST = "phitune.json"


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_key(step: str, inputs: dict, params: dict) -> str:
    """sha256 over everything that shapes an output (and the tool version that made it)."""
    blob = json.dumps({"step": step, "version": __version__, "inputs": inputs, "params": params},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
