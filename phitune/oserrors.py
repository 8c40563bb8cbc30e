"""One place that turns the disk's and the files' problems into `error:` lines.

A full disk, a read-only filesystem or a permission refusal reach phitune as an OSError, or
wrapped by a library in its own exception with only the message left (safetensors'
SafetensorError "IoError ... StorageFull", torch's "PytorchStreamWriter failed writing file",
onnxruntime's RuntimeError); a damaged input reaches it as safetensors' "header too small" /
"file not fully covered", a protobuf DecodeError, or onnxruntime's INVALID_PROTOBUF. None of
these is a bug in phitune, so each becomes one line saying which file and what to do.

`writing(path)` wraps the code that writes an output, so the line names the output even when
the library's message does not; `translate` is the CLI's fallback for everything else.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phitune.errors import InputError, OutputError, PhituneError, first_line

_REDO = "re-download it, or re-run the phitune step that wrote it"

# (errno, words a library keeps from strerror, what happened, what to do)
_WRITE_PROBLEMS = (
    ((errno.ENOSPC, errno.EDQUOT, errno.EFBIG),
     ("No space left on device", "StorageFull", "Disk quota exceeded", "File too large",
      "file write failed", "Failed to write"),
     "no space left on the device",
     "free space there or choose an -o on another disk, then run again (nothing was published)"),
    ((errno.EROFS,), ("Read-only file system", "ReadOnlyFilesystem"),
     "the filesystem is read-only",
     "choose a writable -o"),
    ((errno.EACCES, errno.EPERM), ("Permission denied", "PermissionDenied"),
     "permission denied",
     "choose a writable -o, or fix the directory's permissions"),
)

# Library errors that mean an input file is damaged: (type name, words in the message).
_CORRUPT = (
    ("SafetensorError", ()),
    ("DecodeError", ()),                       # protobuf: a damaged .onnx
    ("InvalidProtobuf", ()),                   # onnxruntime
    ("Fail", ("Protobuf parsing failed", "INVALID_PROTOBUF")),
    ("RuntimeError", ("Protobuf parsing failed", "INVALID_PROTOBUF", "header too small",
                      "file not fully covered", "incomplete metadata")),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def translate(exc: BaseException, path: Path | str | None = None,
              option: str = "-o") -> PhituneError | None:
    """The user-fixable error `exc` stands for, or None when it is not one (a bug)."""
    if isinstance(exc, PhituneError):
        return exc
    for link in _chain(exc):
        text = str(link)
        code = getattr(link, "errno", None) if isinstance(link, OSError) else None
        for codes, words, what, fix in _WRITE_PROBLEMS:
            if code in codes or any(w in text for w in words):
                where = getattr(link, "filename", None) if isinstance(link, OSError) else None
                where = where or path
                if code in (errno.EACCES, errno.EPERM) and path is None:
                    fix = "check the file's permissions, or choose a writable -o"
                return OutputError(what, option if where is None else str(where), fix)
        name = type(link).__name__
        for type_name, words in _CORRUPT:
            if name == type_name and (not words or any(w in text for w in words)):
                where = getattr(link, "filename", None) or None
                return InputError(f"a model or weights file is damaged ({first_line(link, 160)})",
                                  str(where) if where else "an input of this step", _REDO)
    return None


@contextmanager
def writing(path: Path | str, option: str = "-o") -> Iterator[None]:
    """Turn an OS-level write failure inside the block into one line naming `path`."""
    try:
        yield
    except PhituneError:
        raise
    except Exception as exc:
        error = translate(exc, path, option)
        if error is None or isinstance(error, InputError):
            raise
        raise error from None


def quietly(action, *args) -> None:
    """Run a cleanup step whose own failure (on a full or read-only disk) must not hide the
    error that is already on its way to the user."""
    try:
        action(*args)
    except OSError:
        pass
