"""The state of one translation: the Olive file, the phitune steps made so far, and every key
read but not applied (a note), with the one-line refusal for what cannot be translated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from phitune.errors import OptionError
from phitune.workflow.olive.tables import NO_EQUIVALENT


class Translation:
    def __init__(self, raw: dict, source: Path):
        self.raw = raw
        self.source = source
        self.notes: list[tuple[str, str]] = []   # (key path, why)
        self.steps: list[dict] = []

    def note(self, path: str, why: str = NO_EQUIVALENT) -> None:
        self.notes.append((path, why))

    def fail(self, path: str, what: str, fix: str) -> NoReturn:
        raise OptionError(f"{path}: {what}", str(self.source), fix)

    def note_lines(self) -> list[str]:
        """Notes grouped by parent key and reason: `passes.lora.training_args: a, b — why`."""
        groups: dict[tuple[str, str], list[str]] = {}
        for path, why in self.notes:
            parent, _, leaf = path.rpartition(".")
            groups.setdefault((parent, why), []).append(leaf)
        return [f"{parent}: {', '.join(leaves)} — {why}" if len(leaves) > 1 and parent
                else f"{parent + '.' if parent else ''}{leaves[0]} — {why}"
                for (parent, why), leaves in groups.items()]

    def fields(self, node: dict, path: str, skip: tuple = ()) -> dict[str, tuple[Any, str]]:
        """Olive's `config: {...}` wrapper (older files) and flat fields (newer) alike."""
        out = {}
        config = node.get("config")
        if isinstance(config, dict):
            for k, v in config.items():
                out[k] = (v, f"{path}.config.{k}")
        for k, v in node.items():
            if k not in skip and k != "config":
                out[k] = (v, f"{path}.{k}")
        return out
