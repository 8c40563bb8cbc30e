"""One rule for every file phitune reads whole (data, calibration and eval text, a .gguf, a
workflow config, a model's config.json and weights): it is a regular file of sane size, and
no line of a text file is larger than LINE_LIMIT.

A character device (/dev/zero), a FIFO, a socket or a directory — with or without a symlink in
front — is refused before a byte is read: reading /dev/zero grows memory without bound, and a
FIFO blocks forever. The size comes from `stat`, so it is known before reading; a text file's
lines are measured as it is read, so one 2 GB line is refused at its file:line instead of
being parsed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from phitune.errors import InputError, PhituneError

# A line (one JSONL record, one CSV row, one line of text) larger than this is refused: no
# training record or calibration line is near it, and json.loads of a larger one takes
# seconds and gigabytes.
LINE_LIMIT = 16 * 2**20
# A text file (data, calibration, eval, config) larger than this is refused before reading:
# it is read whole into memory.
TEXT_LIMIT = 4 * 2**30
CONFIG_LIMIT = 16 * 2**20  # a workflow file or a model's config.json

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def kind_of(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (links followed); else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def exists_irregular(path: Path) -> bool:
    return kind_of(path) is not None


def check_regular(path: str | Path, option: str | None, error: type[PhituneError] = InputError,
                  limit: int | None = None) -> Path:
    """`path` as a Path when it is a regular file (of at most `limit` bytes); otherwise one
    `error` naming the path and what it is. A missing path is the caller's to word."""
    path = Path(path)
    kind = kind_of(path)
    if kind is not None:
        link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise error(f"{path} exists but is not a regular file: it is {kind}{link}", option,
                    "pass a regular file (not a device, pipe, socket or directory)")
    if limit is not None and path.is_file() and path.stat().st_size > limit:
        raise error(f"{path} is {path.stat().st_size / 2**20:.0f} MB, over the "
                    f"{limit / 2**20:.0f} MB limit for this file", option,
                    "pass a smaller file, or split it")
    return path


def read_bytes(path: str | Path, option: str | None, error: type[PhituneError] = InputError,
               limit: int = TEXT_LIMIT, line_limit: int | None = LINE_LIMIT) -> bytes:
    """A regular file's bytes, each line at most `line_limit` bytes (None: no line check);
    reads no more than the size `stat` gave (a file growing while read is cut there)."""
    path = check_regular(path, option, error, limit)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        data = fh.read(size)
    if line_limit is not None:
        check_lines(data, path, error, line_limit)
    return data


def read_text(path: str | Path, option: str | None, error: type[PhituneError] = InputError,
              limit: int = TEXT_LIMIT, errors: str = "strict") -> str:
    """`read_bytes` decoded as UTF-8 (a BOM dropped)."""
    return read_bytes(path, option, error, limit).decode("utf-8-sig", errors=errors)


def check_lines(data: bytes, path: Path, error: type[PhituneError] = InputError,
                line_limit: int = LINE_LIMIT) -> None:
    """Refuse the first line longer than `line_limit` bytes, at its file:line."""
    if len(data) <= line_limit:
        return
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > line_limit:
            raise error(f"line {number} of {path} is {(end - start) / 2**20:.0f} MB, over the "
                        f"{line_limit / 2**20:.0f} MB limit for one line", f"{path}:{number}",
                        "split that record, or check that this is the file you meant")
        start, number = end + 1, number + 1
