"""Console output: human text to stderr through rich, a machine summary to stdout.

Every command prints progress and a summary on stderr so that stdout stays clean
for `--json` (and for `infer`'s answers).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

console = Console(stderr=True, highlight=False)

_state = {"verbose": False, "json": False, "stdout": None}


def configure(verbose: bool = False, json_output: bool = False, guard_stdout: bool = True) -> None:
    """Set the output mode, and keep stdout for phitune's own results: anything else that
    prints there (some libraries print banners on import) is sent to stderr instead.
    `guard_stdout=False` when only help will be printed, which belongs on stdout."""
    _state["verbose"] = verbose
    _state["json"] = json_output
    _state["stdout"] = sys.stdout
    if guard_stdout:
        sys.stdout = sys.stderr


def emit(text: str) -> None:
    """Write a result (a JSON summary, an answer) to the real stdout."""
    out = _state["stdout"] or sys.stdout
    out.write(text)
    out.flush()


def json_mode() -> bool:
    return _state["json"]


def verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    console.print(message)


def debug(message: str) -> None:
    if _state["verbose"]:
        console.print(f"[dim]{message}[/dim]")


def error_line(line: str) -> None:
    console.print(line, style="red", markup=False, soft_wrap=True)


class _Progress(Progress):
    """Rich's live bar on a terminal; in a log or CI, where it is off, a plain line at every
    tenth of the way, so a long step never runs silent."""

    def __init__(self, *columns, plain: bool, **kwargs):
        super().__init__(*columns, **kwargs)
        self._plain = plain
        self._tenths: dict = {}

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def _say(self, task_id) -> None:
        task = self._tasks[task_id]
        if not self._plain or not task.total:
            return
        tenth = int(10 * task.completed / task.total)
        if tenth <= self._tenths.get(task_id, 0):
            return
        self._tenths[task_id] = tenth
        figures = "".join(f", {name} {value}" for name, value in task.fields.items() if value != "")
        self.console.print(f"{task.description}: {task.completed:g}/{task.total:g}{figures}, "
                           f"{task.elapsed or 0:.0f} s", markup=False, highlight=False)


@contextmanager
def progress(description: str, total: int, *fields: str) -> Iterator[Any]:
    """A progress bar; `fields` are extra named figures shown after the bar
    (update them with `bar.update(task, loss=...)`)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    live = console.is_terminal or _state["verbose"]
    with _Progress(*columns, console=console, transient=False, disable=not live,
                   plain=not live) as bar:
        task = bar.add_task(description, total=total, **{name: "" for name in fields})
        yield bar, task


def summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table of figures; with --json the same dict goes to stdout."""
    if _state["json"]:
        emit(json.dumps(rows, indent=2, default=str) + "\n")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, _format(value))
    console.print(table)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    return str(value)
