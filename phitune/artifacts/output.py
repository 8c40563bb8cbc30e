"""Atomic outputs: every step's output dir (and every GGUF conversion) is written here.

Work goes into a hidden sibling dir (`hidden.staging`) that is swapped into place only when
complete, with the manifest written last, so a failed or killed step never leaves an output
that looks done; a step's first write clears what killed runs left (`recover`). Before
any work, `Output.begin` keys the output, refuses a path that cannot or must not be written
(a file, a foreign dir, one of the step's own inputs, a read-only place), and says whether
the output is already up to date.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phitune import __version__, hidden, oserrors
from phitune.artifacts.manifest import MANIFEST, changed_files, file_sizes, make_key, read_manifest
from phitune.errors import OutputError


class Output:
    """One step's output directory: its key, up-to-date check and atomic publish.

    `key`: the output is filed under this key rather than one made of `inputs` and `params`
    (a GGUF conversion is keyed by its file's bytes alone, wherever that file was found).
    `shared`: a cache entry other processes may be reading; one published under the same key
    while this one was made is kept, not swapped out from under its readers.
    """

    def __init__(self, path: str | Path, artifact: str, step: str, inputs: dict, params: dict,
                 key: str | None = None, shared: bool = False):
        self.path = Path(path).expanduser()
        self.artifact = artifact
        self.step = step
        self.inputs = inputs
        self.params = params
        self.key = key or make_key(step, inputs, params)
        self.shared = shared

    @classmethod
    def begin(cls, path: str | Path, artifact: str, step: str, inputs: dict, params: dict,
              force: bool, reads: tuple = ()) -> tuple["Output", dict | None]:
        """Every step's first half, once: key the output, refuse one that cannot be written
        (before any work), and hand back the published manifest when it is up to date (the
        step then returns it: same inputs and options, nothing to do)."""
        out = cls(path, artifact, step, inputs, params)
        out.check_writable(force=force, reads=reads)
        return out, (out.existing() if out.up_to_date() and not force else None)

    def existing(self) -> dict | None:
        return read_manifest(self.path)

    def up_to_date(self) -> bool:
        """The same key, and every file the manifest lists still has the size it was published
        with (a truncated or deleted weights file means the step runs again)."""
        manifest = self.existing()
        if not (manifest and manifest.get("key") == self.key):
            return False
        damaged = changed_files(self.path, manifest)
        if damaged:
            from phitune import ui
            ui.info(f"{self.path}: {damaged[0]}{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}"
                    " changed since it was published; running the step again")
            return False
        return True

    def check_writable(self, force: bool = False, reads: tuple = ()) -> None:
        """Refuse, before any work, an output that would destroy something not ours: an
        existing file or foreign directory, an unwritable place, or any of the step's inputs
        (`reads`: model dirs, adapters, data and calibration files), which --force never
        overrides."""
        out = self.path
        check_not_overlapping(out, reads)
        if (out.exists() or out.is_symlink()) and not out.is_dir():  # a file, FIFO, device
            raise OutputError(f"output path {out} is an existing file", "-o",
                              "choose a directory path")
        if out.is_dir():
            manifest = self.existing()
            if manifest is None and any(out.iterdir()):
                raise OutputError(f"output directory {out} exists and is not a phitune output",
                                  "-o", "choose a new path or empty that directory")
            if manifest and manifest.get("artifact") != self.artifact and not force:
                raise OutputError(f"output directory {out} holds a {manifest.get('artifact')} "
                                  f"artifact, not {self.artifact}", "-o",
                                  "choose another path, or pass --force to replace it")
        check_parent_writable(out)
        probe_writable(out)

    @contextmanager
    def staging(self, name_output: bool = True) -> Iterator[Path]:
        """A hidden sibling directory to write into; removed if the step fails. A full or
        read-only disk inside it is one `error:` line naming the output (oserrors.py), or,
        with `name_output=False`, left to the CLI's last resort (the file, else `-o`)."""
        writing = oserrors.writing if name_output else _as_raised
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            recover(self.path)
        work = hidden.staging(self.path)
        shutil.rmtree(work, ignore_errors=True)
        try:
            with writing(self.path):
                work.mkdir()
                yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def publish(self, work: Path, metrics: dict, **sections) -> dict:
        """Write the manifest last, then swap the finished directory into place. `sections`
        are a step's own top-level entries (finetune's per-step `history`)."""
        manifest = {
            "artifact": self.artifact,
            "created_by": f"phitune {self.step} {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "inputs": self.inputs,
            "params": self.params,
            "key": self.key,
            "metrics": metrics,
            **sections,
            "files": file_sizes(work),
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        published = self.existing() if self.shared else None
        if published and published.get("key") == self.key:  # another process was first
            return published  # its entry is kept; staging() removes ours
        _swap_into_place(work, self.path)
        return manifest


@contextmanager
def _as_raised(_path: Path) -> Iterator[None]:
    yield


def recover(out: Path) -> None:
    """Undo what a killed run left: stale temp dirs, or an old output moved aside mid-swap.
    A temp dir is stale only when its run is dead and no process works inside it (the model
    builder child runs with its cwd in its parent's temp dir)."""
    for stale in hidden.stagings(out):
        if not hidden.owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    old = hidden.moved_aside(out)
    if old.exists():
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)


def probe_writable(out: str | Path, option: str = "-o") -> None:
    """Prove, before any model loads, that `out` can be made: create its missing parents and
    a staging dir beside it (as `Output.staging` will), then remove what was created. Root
    passes `os.access` everywhere, so only a real mkdir tells that /proc or a read-only or
    full mount refuses."""
    out = Path(out).expanduser()
    made: list[Path] = []
    probe = hidden.staging(out)  # the very dir Output.staging makes later, made and removed
    try:
        for parent in reversed([out.parent, *out.parent.parents]):
            if not parent.exists():
                parent.mkdir()
                made.append(parent)
        probe.mkdir()
        made.append(probe)
    except OSError as exc:
        reason = "the filesystem is read-only" if exc.errno == errno.EROFS else \
            (exc.strerror or str(exc)).lower()
        raise OutputError(f"cannot create {out} ({reason} at {exc.filename or probe})", option,
                          "choose a writable location") from None
    finally:
        for path in reversed(made):
            oserrors.quietly(os.rmdir, path)


def check_parent_writable(out: Path) -> None:
    """The nearest existing parent of `out` takes new files (a read-only filesystem said as such)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not os.access(parent, os.W_OK):
                read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
                raise OutputError(f"{parent} is on a read-only filesystem" if read_only
                                  else f"cannot write under {parent}", "-o",
                                  "choose a writable location")
            break


def check_not_overlapping(out: Path, reads, option: str = "-o") -> None:
    """Refuse an output equal to, inside, or containing an input, whatever --force says:
    publishing swaps the output dir into place and removes what was there. Paths are compared
    with links resolved (a finetune output's model/ is a link to its base)."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    for read in reads:
        if read is None:
            continue
        source = Path(os.path.realpath(Path(read).expanduser()))
        if target == source:
            how = "is"
        elif source in target.parents:
            how = "is inside"
        elif target in source.parents:
            how = "contains"
        else:
            continue
        raise OutputError(f"output path {out} {how} the input {read}", option,
                          "choose an output path outside the step's inputs (--force does not "
                          "override this: the input would be lost)")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _swap_into_place(work: Path, out: Path) -> None:
    if not out.exists():
        os.rename(work, out)
        return
    if _exchange(work, out):  # work now holds the old output; staging() removes it
        return
    old = hidden.moved_aside(out)
    os.rename(out, old)  # a kill between these two renames is undone by recover()
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
