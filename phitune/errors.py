"""The errors a user can meet.

A user mistake raises a `PhituneError`; the CLI turns it into one line,
`error: <what> — <where> — <what to do>`, and exit code 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class PhituneError(Exception):
    """A problem the user can fix; never a bug."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.fix = fix

    def line(self) -> str:
        parts = [self.what] + [p for p in (self.where, self.fix) if p]
        return "error: " + " — ".join(parts)


class InputError(PhituneError):
    """An input path or model id that cannot be used."""


class OutputError(PhituneError):
    """An output path that cannot be written without losing data."""


class OptionError(PhituneError):
    """Options that are invalid alone or together."""


class DataError(PhituneError):
    """A dataset or calibration file that cannot be used."""


class UnsupportedModelError(PhituneError):
    """A model architecture this step does not handle."""


class DeviceError(PhituneError):
    """A device that was asked for but is not there."""


class Interrupted(PhituneError):
    """Ctrl-C, reported with what survived it (a checkpoint to --resume from). Exit code 130,
    as for any program a SIGINT stopped."""

    exit_code = 130


class ConstraintError(PhituneError):
    """A measured figure misses a bound the user set (`--max_ppl`, `--max_latency_ms`): the
    step ran and reported its figures, but the result is not acceptable. Exit code 3."""

    exit_code = 3

    def __init__(self, what: str, where: str | None = None, fix: str | None = None,
                 metrics: dict | None = None):
        super().__init__(what, where, fix)
        self.metrics = metrics or {}


class ExportError(PhituneError):
    """The model builder failed on an input phitune accepted."""


def first_line(exc: BaseException | str, limit: int = 200, empty: str | None = None,
               sentence: bool = False) -> str:
    """What a library's message says first, for a one-line error: its first non-blank line cut
    to `limit` characters; with `sentence`, its first sentence across line breaks, whole, cut
    at a word and marked with " …" past `limit`, without the final period (hub errors run
    over several lines). Without any text: `empty`, or the exception's type name."""
    if sentence:
        text = " ".join(str(exc).split())
        end = text.find(". ")
        found = text[:end + 1] if end >= 0 else text
        if len(found) > limit:
            found = found[:limit].rsplit(" ", 1)[0] + " …"
        found = found.rstrip(".")
    else:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        found = lines[0][:limit] if lines else ""
    if found:
        return found
    return type(exc).__name__ if empty is None else empty
