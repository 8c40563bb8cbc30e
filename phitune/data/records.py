"""Records as read: plain dicts that remember where they came from (`data/x.jsonl:17`, so
errors name the file and line), and the options that say which records to read and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(kw_only=True)
class RecordOptions:
    """Which records, read how, and which of them are held out: one definition shared by
    finetune (trains on them) and eval (scores them), so both read the same data the same way."""

    data_files: tuple[str, ...] = ()
    data_name: str | None = None
    text_template: str | None = None
    text_cols: str | None = None
    use_chat_template: bool = False
    train_on_prompt: bool = False
    max_seq_len: int = 1024
    overflow: str = "truncate"
    eval_split: float | None = None
    eval_dataset_size: int | None = None
    seed: int = 42


class Record(dict):
    """One dataset record: a plain dict that also knows where it came from."""

    __slots__ = ("source",)

    def __init__(self, data: dict, source: str):
        super().__init__(data)
        self.source = source


def as_records(rows: Sequence[dict]) -> list[Record]:
    """Records as given, or plain dicts tagged with their position ("record 3")."""
    return [r if isinstance(r, Record) else Record(r, f"record {i}") for i, r in enumerate(rows, 1)]
