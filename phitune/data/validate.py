"""The pre-model check: every column the spec needs is in every record, and chat records
are well-formed — without importing torch or transformers, so a data mistake costs a
second, not a model load."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Sequence

from phitune.data.readers import load_records
from phitune.data.records import Record, as_records
from phitune.data.spec import CHAT_COLUMN_PAIRS, CHAT_ROLES, TextSpec
from phitune.errors import DataError

_MAX_LISTED = 12  # columns named in an error message


def load_and_validate(files: str | Path | Sequence[str | Path] | None, data_name: str | None,
                      spec: TextSpec, train_on_prompt: bool = False) -> list[Record]:
    """The whole pre-model check: read the records and check them against the spec.

    Imports neither torch nor transformers, so a mistake in the data is reported in well
    under a second, before a multi-GB model loads.
    """
    records = load_records(files, data_name)
    validate_records(records, spec, train_on_prompt=train_on_prompt)
    return records


def validate_records(records: Sequence[Record], spec: TextSpec, train_on_prompt: bool = False
                     ) -> None:
    """Every column the spec needs is present (and not null) in every record; chat
    records hold well-formed [{role, content}] lists."""
    if not records:
        raise DataError("the dataset has no records", "--data_files",
                        "pass a file with at least one record")
    records = as_records(records)
    available = list(dict.fromkeys(k for r in records for k in r))
    for column in spec.columns:
        if column not in available:
            close = difflib.get_close_matches(column, available, n=1)
            listed = ", ".join(available[:_MAX_LISTED]) + (" …" if len(available) > _MAX_LISTED
                                                            else "")
            raise DataError(f"{spec.option} needs a column '{column}' that no record has "
                            f"(columns: {listed or 'none'})", _sources(records),
                            f"did you mean '{close[0]}'?" if close else
                            f"use one of the columns: {listed}")
        missing = [r for r in records if r.get(column) is None]
        if missing:
            raise DataError(f"{len(missing)} of {len(records)} records have no '{column}' "
                            f"(missing or null), first at {missing[0].source}", missing[0].source,
                            f"fill in '{column}' or remove those records")
    if spec.chat:
        _validate_conversations(records, spec, train_on_prompt)


def _sources(records: Sequence[Record]) -> str:
    files = list(dict.fromkeys(_file_of(r.source) for r in records))
    return ", ".join(files[:3]) + (" …" if len(files) > 3 else "")


def _file_of(source: str) -> str:
    return re.sub(r"(:\d+|:row \d+|\[[^\]]*\])$", "", source)


def messages_of(record: Record, column: str = "messages") -> list[dict] | None:
    """The record's conversation as a list of {role, content}, or None if it is not one.
    A JSON string (as a CSV cell holds it) is parsed."""
    value = record.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list) or not value:
        return None
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            return None
    return value


def conversation(record: Record, spec: TextSpec) -> list[dict] | None:
    """The record as a chat for the model's template: its messages list, or a user turn and an
    assistant turn (and a system turn) from plain columns; None if it is neither."""
    if spec.turn_cols:
        return _turns(record, spec.turn_cols)
    messages = messages_of(record, spec.messages_col)
    if messages is not None or not spec.auto_columns:
        return messages
    for pair in CHAT_COLUMN_PAIRS:
        if all(isinstance(record.get(c), str) for c in pair):
            return _turns(record, pair)
    return None


def _turns(record: Record, columns: Sequence[str]) -> list[dict] | None:
    values = [record.get(c) for c in columns]
    if not all(isinstance(v, str) for v in values):
        return None
    return [{"role": role, "content": value}
            for role, value in zip(CHAT_ROLES[-len(columns):], values)]


def _validate_conversations(records: Sequence[Record], spec: TextSpec,
                            train_on_prompt: bool) -> None:
    bad = [r for r in records if conversation(r, spec) is None]
    if bad and spec.turn_cols:
        raise DataError(f"{len(bad)} of {len(records)} records have a non-text value in "
                        f"{', '.join(spec.turn_cols)}, first at {bad[0].source}", bad[0].source,
                        "make those columns strings or remove the records")
    if bad and spec.auto_columns and bad[0].get(spec.messages_col) is None:
        pairs = ", ".join("/".join(p) for p in CHAT_COLUMN_PAIRS)
        found = ", ".join(list(bad[0])[:_MAX_LISTED]) or "none"
        raise DataError(f"--use_chat_template found no '{spec.messages_col}' list and no column "
                        f"pair it knows ({pairs}) in {len(bad)} of {len(records)} records "
                        f"(columns: {found}), first at {bad[0].source}", bad[0].source,
                        "name the columns: --text_cols PROMPT,RESPONSE, or --text_cols MESSAGES")
    column = spec.messages_col
    if bad:
        raise DataError(f"{len(bad)} of {len(records)} records have a '{column}' that is not a "
                        "non-empty list of {role, content} objects with string values, first at "
                        f"{bad[0].source}", bad[0].source,
                        'write it as [{"role": "user", "content": "..."}, '
                        '{"role": "assistant", "content": "..."}]')
    if not train_on_prompt and not any(m["role"] == "assistant" for r in records
                                       for m in conversation(r, spec)):
        raise DataError(f"no record has an assistant turn in '{column}', so there is nothing to "
                        "train on", _sources(records),
                        "add assistant replies, or pass --train_on_prompt to train on all text")
