"""The manifest every output carries, and the key it is filed under.

An output dir holds `phitune.json` next to what its step wrote; its `key` is a sha256 over
everything that shaped the output (step, inputs' digests, params, the tool version), and its
`files` the size of every file published, so a damaged output is not taken as done.
`output.Output` writes it (for every step and for GGUF conversions), the resolver reads an
input's, the workflow and `phitune cache` read theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from phitune import __version__

MANIFEST = "phitune.json"
_FULL_HASH_LIMIT = 4 * 2**20  # files up to this size are hashed whole
_SAMPLE = 2**20  # larger files: size plus first and last MiB


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


def content_digest(path: Path) -> str:
    """A digest of a directory's files (an input of a key), cheap on multi-GB checkpoints.

    Small files are hashed whole; large ones by size plus their first and last MiB
    (a safetensors header names every tensor, so edits show up there or in the size).
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.name != MANIFEST)
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode())
        size = file.stat().st_size
        h.update(str(size).encode())
        with open(file, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(_SAMPLE))
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def file_sizes(directory: Path) -> dict[str, int]:
    """relative path → size of the files an output holds (links not followed: a finetune's
    model/ link is its base's, checked when that base is read)."""
    directory = Path(directory)
    sizes = {}
    for root, dirs, files in os.walk(directory):
        for name in files:
            file = Path(root) / name
            if file.is_symlink() or name == MANIFEST:
                continue
            sizes[str(file.relative_to(directory))] = file.stat().st_size
    return sizes


def changed_files(directory: Path, manifest: dict) -> list[str]:
    """Files of a published output that are gone or not the size the manifest recorded
    (manifests written before sizes were recorded check nothing)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return []
    changed = []
    for name, size in recorded.items():
        file = Path(directory) / name
        try:
            if file.stat().st_size != size:
                changed.append(name)
        except OSError:
            changed.append(name)
    return changed
