"""The hidden names phitune gives its work in progress, and whether a leftover's owner lives.

Every output is built beside where it lands, under a hidden name derived from the output's:

    .<name>.phitune-tmp-<pid>    a step's (or a GGUF conversion's) staging dir, and a cache
                                 entry renamed aside while it is removed
    .<name>.phitune-old-         the previous output, moved aside mid-swap (no atomic exchange)
    .<name>.phitune-ckpt         an interrupted finetune's checkpoint (same parent as the output)
    .<name>.phitune-link-<pid>   a workflow's output link before it is renamed over the old one

This module is the only one that spells them: writers ask it for the name, cleaners
(`artifacts.output.recover` before a step or a GGUF conversion writes, `phitune cache clean`)
ask it whether a name is one of these and whether the process that made it is still alive.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

_TMP = ".phitune-tmp-"
_OLD = ".phitune-old-"
_CKPT = ".phitune-ckpt"
_LINK = ".phitune-link-"
# What a cache dir may hold besides entries: a staging dir (with its run's pid) or a checkpoint.
_STAGING_NAME = re.compile(r"^\..+" + re.escape(_TMP) + r"(?P<pid>\d+)$")
_CHECKPOINT_NAME = re.compile(r"^\..+" + re.escape(_CKPT) + r"$")


def staging(path: Path) -> Path:
    """The staging dir this process writes `path` in before renaming it into place."""
    path = Path(path)
    return path.parent / f".{path.name}{_TMP}{os.getpid()}"


def stagings(path: Path) -> Iterator[Path]:
    """Every staging dir of `path`, this process's and others' (alive or not)."""
    path = Path(path)
    return path.parent.glob(f".{path.name}{_TMP}*")


def moved_aside(path: Path) -> Path:
    """Where the previous output waits while the new one is renamed into place."""
    path = Path(path)
    return path.parent / f".{path.name}{_OLD}"


def checkpoint(path: Path) -> Path:
    """Where an interrupted finetune of output `path` keeps its checkpoint."""
    path = Path(path)
    return path.parent / f".{path.name}{_CKPT}"


def link_staging(link: Path) -> Path:
    """The link this process makes before renaming it over `link`."""
    link = Path(link)
    return link.parent / f".{link.name}{_LINK}{os.getpid()}"


def leftover_kind(name: str) -> str | None:
    """'staging' or 'checkpoint' for a name phitune leaves in a cache dir; None otherwise."""
    if _STAGING_NAME.match(name):
        return "staging"
    if _CHECKPOINT_NAME.match(name):
        return "checkpoint"
    return None


def owner_alive(path: Path) -> bool:
    """Whether the run that made staging dir `path` may still use it: the pid in its name is
    alive, or a process works inside it (the model builder child runs with its cwd there)."""
    pid = Path(path).name.rsplit("-", 1)[-1]
    return (pid.isdigit() and _alive(int(pid))) or _in_use(Path(path))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(directory: Path) -> bool:
    """Whether a process has its working directory inside `directory` (Linux /proc; False
    where /proc is absent)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    root = os.path.realpath(directory)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep):
            return True
    return False
