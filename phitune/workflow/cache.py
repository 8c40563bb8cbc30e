"""`phitune cache ls|clean`: what a workflow cache holds, and pruning it.

An entry is a direct child `<type>-<16 hex>` of the cache dir holding a `phitune.json`.
An entry is *in use* when the last run of a workflow whose output_dir still exists used it
(`<output_dir>/phitune-workflow.json` names every entry of that run, published or not), or
when an entry in use links into it (a finetune's `model/` links to the quantize entry it
trained on). `clean` never removes an entry that a kept entry links into.

    clean --all              every entry, interrupted-run leftovers and the registry
    clean --unused           entries no workflow output uses (see above)
    clean --older-than 7d    entries not used by any run for that long (s, m, h, d, w);
                             with --unused: entries both unused and that old
Leftovers of killed runs (temporary dirs whose process is gone) are always removed.
Nothing outside the entry / leftover name patterns is ever touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from phitune import hidden, registry
from phitune.artifacts.gguf import ENTRY_PREFIX as GGUF_PREFIX
from phitune.artifacts.manifest import read_manifest
from phitune.errors import OptionError
from phitune.workflow.run import RECORD, REGISTRY, read_registry

# <step type>-<key>: the workflow names each step's entry so (registry.STEPS lists the types);
# gguf-<key>: a .gguf input's conversion (phitune/artifacts/gguf.py), listed and cleaned with --gguf
ENTRY = re.compile(r"^(?P<type>" + "|".join(map(re.escape, (*registry.STEPS, GGUF_PREFIX[:-1])))
                   + r")-(?P<key>[0-9a-f]{16})$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    path: Path
    type: str
    artifact: str
    created_at: str
    last_used: float                 # dir mtime: set when made, touched by every run using it
    size_mb: float
    used_by: list[str] = field(default_factory=list)   # output dirs
    links_to: list[str] = field(default_factory=list)  # other entries it links into

    @property
    def name(self) -> str:
        return self.path.name

    def row(self) -> dict:
        return {"entry": self.name, "type": self.type, "artifact": self.artifact,
                "size_mb": round(self.size_mb, 1), "created_at": self.created_at,
                "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_used)),
                "used_by": self.used_by, "links_to": self.links_to}


def parse_age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise OptionError(f"--older-than {text!r} is not an age", "--older-than",
                          "write a number and a unit: 30m, 12h, 7d, 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def entries(cache_dir: Path) -> list[Entry]:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    found = []
    for path in sorted(cache_dir.iterdir()):
        match = ENTRY.match(path.name)
        manifest = read_manifest(path) if match and path.is_dir() and not path.is_symlink() \
            else None
        if not manifest:
            continue
        found.append(Entry(path, match.group("type"), str(manifest.get("artifact", "?")),
                           str(manifest.get("created_at", "")), path.stat().st_mtime,
                           _size_mb(path), links_to=_links(path, cache_dir)))
    users = _users(cache_dir)
    for entry in found:
        entry.used_by = users.get(entry.name, [])
    return found


def _size_mb(path: Path) -> float:
    """Bytes under `path`, links not followed (a finetune's model/ link costs nothing)."""
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not descend into dir links
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total / 2**20


def _links(path: Path, cache_dir: Path) -> list[str]:
    """The other entries this one links into (one level down: D/model → quantize entry)."""
    cache = cache_dir.resolve()
    out = []
    for child in path.iterdir():
        if child.is_symlink():
            target = child.resolve()
            for parent in (target, *target.parents):
                if parent.parent == cache and ENTRY.match(parent.name):
                    out.append(parent.name)
                    break
    return sorted(set(out))


def _users(cache_dir: Path) -> dict[str, list[str]]:
    """entry name → the output dirs whose last run used it."""
    cache = cache_dir.resolve()
    users: dict[str, list[str]] = {}
    for out in read_registry(cache_dir):
        try:
            rec = json.loads((Path(out) / RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # the output dir is gone: its entries are no longer used by it
        if Path(rec.get("cache_dir", "")).resolve() != cache:
            continue
        for step in rec.get("steps", {}).values():
            users.setdefault(step.get("entry", ""), []).append(out)
    return users


def leftovers(cache_dir: Path) -> list[tuple[Path, str]]:
    """Temporary dirs of runs whose process is gone, and interrupted finetunes' checkpoints."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    out = []
    for path in sorted(cache_dir.iterdir()):
        kind = hidden.leftover_kind(path.name)
        if kind == "staging" and not hidden.owner_alive(path):
            out.append((path, "stale"))
        elif kind == "checkpoint":
            out.append((path, "checkpoint"))
    return out


def select(cache_dir: Path, all_: bool = False, unused: bool = False,
           older_than: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """(to remove, kept because a kept entry links into them)."""
    if not (all_ or unused or older_than is not None):
        raise OptionError("clean what? no --all, --unused or --older-than given", "phitune cache clean",
                          "pass --unused (entries no workflow output uses), --older-than 7d, "
                          "or --all")
    found = entries(cache_dir)
    if all_:
        return found, []
    now = time.time()
    remove = {e.name for e in found
              if (not unused or not e.used_by)
              and (older_than is None or now - e.last_used > older_than)}
    by_name = {e.name: e for e in found}
    protected: list[Entry] = []
    changed = True
    while changed:  # keep whatever a kept entry links into
        changed = False
        for e in found:
            if e.name in remove:
                continue
            for target in e.links_to:
                if target in remove:
                    remove.discard(target)
                    protected.append(by_name[target])
                    changed = True
    return [e for e in found if e.name in remove], protected


def clean(cache_dir: Path, all_: bool = False, unused: bool = False,
          older_than: float | None = None, dry_run: bool = False) -> dict:
    cache_dir = Path(cache_dir)
    remove, protected = select(cache_dir, all_, unused, older_than)
    extra = [(p, why) for p, why in leftovers(cache_dir) if why == "stale" or all_]
    freed = sum(e.size_mb for e in remove)
    if not dry_run:
        for entry in remove:
            _remove(entry.path)
        for path, _why in extra:
            _remove(path)
        if all_:
            (cache_dir / REGISTRY).unlink(missing_ok=True)
    return {"removed": [e.name for e in remove], "kept_linked": [e.name for e in protected],
            "leftovers": [p.name for p, _ in extra], "freed_mb": round(freed, 1),
            "dry_run": dry_run}


def _remove(path: Path) -> None:
    """Rename aside first, so a half-deleted entry never looks complete."""
    doomed = hidden.staging(path)
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)
