"""Records as read: plain dicts that remember where they came from (`data/x.jsonl:17`, so
errors name the file and line), and the options that say which records to read and how."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from phitune import options as O


@dataclass(kw_only=True)
class RecordOptions:
    """Which records, read how, and which of them are held out: one definition shared by
    finetune (trains on them) and eval (scores them), so both read the same data the same way."""

    # Finetune and eval word some helps their own way (their HELP); the rest reads the same.
    data_files: tuple[str, ...] = O.option((), multiple=True, metavar="FILE")
    data_name: str | None = O.option(None, "json|csv|parquet, or a local dataset dir "
                                     "(save_to_disk).", metavar="NAME", type=str)
    text_template: str | None = O.option(
        None, r"Text with {column} placeholders and \n escapes; loss on the part from the last "
        "one.", metavar="TEMPLATE", type=str)
    text_cols: str | None = O.option(
        None, "Columns the template uses (joined by newlines without one); with "
        "--use_chat_template: the messages column, or PROMPT,RESPONSE (SYSTEM,PROMPT,RESPONSE) "
        "columns.", metavar="A,B", type=str)
    use_chat_template: bool = O.option(
        False, "Render records with the model's own chat template: a 'messages' list, or "
        "prompt/response, instruction/output or question/answer columns; loss on the assistant "
        "turns.", flag=True)
    train_on_prompt: bool = O.option(False, flag=True)
    max_seq_len: int = O.option(1024, min=2)
    overflow: str = O.option("truncate", "What to do with records longer than --max_seq_len.",
                             choices=("truncate", "drop"), dashed=False)
    eval_split: float | None = O.option(None, type=float, above=0, below=1)
    eval_dataset_size: int | None = O.option(None, type=int, min=1)
    seed: int = O.option(42, dashed=False, min=0, max=2**32 - 1)


class Record(dict):
    """One dataset record: a plain dict that also knows where it came from."""

    __slots__ = ("source",)

    def __init__(self, data: dict, source: str):
        super().__init__(data)
        self.source = source


def as_records(rows: Sequence[dict]) -> list[Record]:
    """Records as given, or plain dicts tagged with their position ("record 3")."""
    return [r if isinstance(r, Record) else Record(r, f"record {i}") for i, r in enumerate(rows, 1)]


RECORD_FIELDS = ("data_files", "data_name", "text_template", "text_cols", "use_chat_template",
                 "train_on_prompt", "max_seq_len", "overflow", "eval_split", "eval_dataset_size",
                 "seed")


def split_files(data_files) -> tuple[str, ...]:
    """--data_files as given: repeated, comma-separated, or one path."""
    if isinstance(data_files, (str, Path)):
        data_files = [data_files]
    return tuple(f.strip() for group in data_files or () for f in str(group).split(",")
                 if f.strip())
