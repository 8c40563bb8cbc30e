"""Each step's entry key: sha256 over its type, its options as parsed (defaults filled in, so
spelling an option at its default changes nothing), the keys of the steps it reads (`@name`),
content digests of the local files and directories it reads (so moving a data file keeps the
cache; editing it re-runs the step), and `sequence_start.RULE` (what starts every sequence a
step feeds its model). The step's entry is `<cache_dir>/<type>-<key16>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phitune.artifacts.embedded import EMBEDDED_MODELS, embedded_path
from phitune.artifacts.manifest import content_digest, make_key, read_manifest
from phitune.sequence_start import RULE
from phitune.workflow.steps import REF, Step


def key_steps(steps: list[Step], cache_dir: Path) -> None:
    """Sets each step's key and entry, in file order (a step's key holds those it reads)."""
    digests: dict[str, str] = {}
    keys: dict[str, str] = {}
    for step in steps:
        params = {k: _keyed(v, k, keys, digests) for k, v in step.params.items()}
        params["sequence_start"] = RULE  # every step's data starts by it (quantize, eval...)
        step.key = make_key(f"workflow/{step.type}", {"steps": {d: keys[d] for d in step.deps}},
                            params)
        keys[step.name] = step.key
        step.entry = cache_dir / f"{step.type}-{step.key[:16]}"


def _keyed(value: Any, option: str, keys: dict, digests: dict) -> Any:
    """An option value as it enters the key: refs by the key of their step, local files and
    directories by their content, everything else as parsed."""
    if isinstance(value, (list, tuple)):
        return [_keyed(v, option, keys, digests) for v in value]
    if not isinstance(value, str):
        return value
    ref = REF.match(value)
    if ref:
        return {"step": keys[ref.group(1)], "path": ref.group(2) or ""}
    if option == "model" and value in EMBEDDED_MODELS:
        return {"digest": _digest(embedded_path(value), digests)}
    parts = [p.strip() for p in value.split(",")] if "," in value else [value]
    if option != "text_template" and all(p and Path(p).expanduser().exists() for p in parts):
        found = [{"digest": _digest(Path(p).expanduser(), digests)} for p in parts]
        return found[0] if len(found) == 1 else found
    return value


def _digest(path: Path, cache: dict) -> str:
    real = str(path.resolve())
    if real not in cache:
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest and manifest.get("key"):  # a phitune output: its key says what it holds
            cache[real] = f"key:{manifest['key']}"
        elif path.name == "model" and (parent := read_manifest(path.parent)) and parent.get("key"):
            cache[real] = f"key:{parent['key']}/model"
        else:
            cache[real] = content_digest(path)
    return cache[real]
