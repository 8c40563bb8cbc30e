"""Fine-tuning data: read, validate, render, tokenize, mask, pack.

The flow, in the order `phitune finetune` runs it:

1. `make_spec` and `validate_options` check the options, and `load_and_validate` reads
   the records and checks them against the spec — before any model loads, and without
   importing torch or transformers, so a typo costs a second, not a model load;
2. `split_records` holds out an eval set, deterministically;
3. `tokenize_examples` renders each record (a text template, text columns or the tokenizer's
   chat template), tokenizes it once and masks the labels of everything but the response;
4. `pack` fills rows of exactly `max_seq_len` tokens with whole examples, and
   `collate_packed` turns rows into tensors with a block-diagonal causal mask so that the
   examples sharing a row never see each other; `pad_batch` is the unpacked baseline.

`prepare` runs 2–4 and returns the statistics the caller prints and stores in the manifest.
Every record remembers where it came from (`Record.source`, e.g. `data/x.jsonl:17`), so
errors name the file and line.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import functools
import glob
import io
import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from phitune.errors import DataError, OptionError

IGNORE_INDEX = -100  # label of a token that is not trained on (the loss skips it)
FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}
OVERFLOW = ("truncate", "drop")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_MAX_LISTED = 12  # columns named in an error message


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


# ---------------------------------------------------------------- the text spec

@dataclass(frozen=True)
class TextSpec:
    """How a record becomes training text: a template, text columns, or the chat template."""

    template: str | None = None  # already unescaped: real newlines and tabs; None: join cols
    text_cols: tuple[str, ...] = ()
    chat: bool = False
    messages_col: str = "messages"
    option: str = "--text_template"  # the option to name when the data does not fit

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns every record needs."""
        if self.chat:
            return (self.messages_col,)
        return tuple(dict.fromkeys([*placeholders(self.template), *self.text_cols]))


def unescape(template: str) -> str:
    """Turn the two-character escapes a shell passes (`\\n`, `\\t`, `\\r`, `\\\\`) into the
    characters they stand for; any other backslash stays as it is."""
    return re.sub(r"\\([nt\\r])", lambda m: _ESCAPES[m.group(1)], template)


def placeholders(template: str | None) -> list[str]:
    """The column names a template substitutes, in order (repeats kept)."""
    return [name for _, name, _, _ in _parse(template or "") if name is not None]


@functools.lru_cache(maxsize=64)
def _parse(template: str) -> list[tuple[str, str | None, str | None, str]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OptionError(f"--text_template is not a valid template ({exc})", "--text_template",
                          "write {column} for a column and {{ or }} for a literal brace") from None


def make_spec(text_template: str | None = None, text_cols: str | Sequence[str] | None = None,
              use_chat_template: bool = False) -> TextSpec:
    """Check the text options together and build the spec, before any data or model is read.

    `text_cols` names the columns the template uses (Olive's seed configs); without a template
    they are joined with newlines, which is the same as the template `{a}\\n{b}`. With
    `use_chat_template` a single text column names the messages column.
    """
    if isinstance(text_cols, str):
        text_cols = [c.strip() for c in text_cols.split(",")]
    cols = tuple(c for c in (text_cols or ()) if c)
    if text_cols is not None and len(cols) != len(list(text_cols)):
        raise OptionError("--text_cols has an empty column name", "--text_cols",
                          "pass column names separated by commas, e.g. --text_cols prompt,response")
    if use_chat_template:
        if text_template:
            raise OptionError("--text_template and --use_chat_template are both given",
                              "--text_template / --use_chat_template",
                              "pass one: a template for text columns, or the chat template "
                              "for a messages column")
        if len(cols) > 1:
            raise OptionError(f"--use_chat_template reads one messages column, --text_cols names "
                              f"{len(cols)}", "--text_cols",
                              "name the single column that holds [{role, content}] lists")
        return TextSpec(chat=True, messages_col=cols[0] if cols else "messages", text_cols=cols,
                        option="--text_cols" if cols else "--use_chat_template")
    if not text_template and not cols:
        raise OptionError("no text format given", "--text_template / --text_cols / "
                          "--use_chat_template",
                          'pass --text_template "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n'
                          '{response}<|end|>", --text_cols, or --use_chat_template')
    if not text_template:
        return TextSpec(text_cols=cols, option="--text_cols")
    template = unescape(text_template)
    parts = _parse(template)
    for _, name, _, _ in parts:
        if name is not None and (name == "" or name.isdigit()):
            raise OptionError("--text_template has a positional placeholder "
                              f"'{{{name}}}'", "--text_template",
                              "name a column inside the braces, e.g. {prompt}")
    names = placeholders(template)
    if not names:
        raise OptionError("--text_template has no {column} placeholder, so every record would "
                          "give the same text", "--text_template",
                          "put the columns in braces, e.g. {prompt} and {response}")
    if cols:
        unknown = [n for n in dict.fromkeys(names) if n not in cols]
        if unknown:
            raise OptionError(f"--text_template uses {{{unknown[0]}}}, which --text_cols "
                              f"({', '.join(cols)}) does not name", "--text_template / --text_cols",
                              f"add {unknown[0]} to --text_cols or fix the placeholder")
    return TextSpec(template=template, text_cols=cols)


def validate_options(max_seq_len: int = 1024, overflow: str = "truncate",
                     eval_split: float | None = None, eval_dataset_size: int | None = None) -> None:
    """The numeric data options, checked before any file or model is read."""
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise OptionError(f"--max_seq_len must be an integer of at least 2 (got {max_seq_len!r})",
                          "--max_seq_len", "pass e.g. --max_seq_len 1024")
    if overflow not in OVERFLOW:
        raise OptionError(f"unknown overflow policy '{overflow}'", "--overflow",
                          "pass --overflow truncate or --overflow drop")
    _check_split_options(eval_split, eval_dataset_size)


# ---------------------------------------------------------------- reading records

def load_records(files: str | Path | Sequence[str | Path] | None, data_name: str | None = None
                 ) -> list[Record]:
    """Read every record of the data files (or of a `save_to_disk` directory named by
    `data_name`), each tagged with its source location.

    json/jsonl are parsed here, line by line, so a malformed line is reported as file:line
    (a `.json` file may also be one JSON array of records). CSV goes through the csv module
    for the same reason; parquet through pyarrow; a saved dataset directory through
    `datasets.load_from_disk`.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    files = [str(f) for f in (files or [])]
    fmt = _data_format(data_name, files)
    if fmt == "dir":
        if files:
            raise OptionError(f"--data_name {data_name} is a saved dataset directory, which takes "
                              "no --data_files", "--data_files",
                              "drop --data_files, or pass --data_name json|csv|parquet")
        records = _read_saved_dataset(Path(data_name))
        where = str(data_name)
    else:
        paths = _expand(files)
        reader = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        records = [rec for path in paths for rec in reader(path)]
        where = ", ".join(files)
    if not records:
        raise DataError("the dataset has no records", where,
                        "pass a file with at least one record")
    return records


def _data_format(data_name: str | None, files: list[str]) -> str:
    if data_name and data_name.lower() in FORMATS:
        fmt = FORMATS[data_name.lower()]
        if not files:
            raise OptionError(f"--data_name {data_name} needs --data_files", "--data_files",
                              f"pass one or more .{'jsonl' if fmt == 'json' else fmt} files")
        for f in files:
            other = SUFFIXES.get(Path(f).suffix.lower())
            if other and other != fmt:
                raise OptionError(f"--data_name {data_name} does not read {f}, a {other} file",
                                  "--data_name", f"pass --data_name {other}")
        return fmt
    if data_name:
        if Path(data_name).is_dir():
            return "dir"
        known = "json, csv, parquet, or a directory saved with Dataset.save_to_disk"
        if Path(data_name).suffix.lower() in SUFFIXES or Path(data_name).is_file():
            raise DataError(f"--data_name {data_name} is a file, not a dataset kind", "--data_name",
                            f"pass --data_name {SUFFIXES.get(Path(data_name).suffix.lower(), 'json')}"
                            f" --data_files {data_name}")
        raise DataError(f"unknown --data_name '{data_name}' (no such directory either)",
                        "--data_name", f"pass one of: {known}")
    if not files:
        raise OptionError("no data given", "--data_files", "pass --data_files FILE [--data_name "
                          "json|csv|parquet] or --data_name DIR (a saved dataset)")
    kinds = {SUFFIXES.get(Path(f).suffix.lower()) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise OptionError("cannot tell the data format from the file names "
                          f"({', '.join(files)})", "--data_name",
                          "pass --data_name json, csv or parquet")
    return kinds.pop()


def _expand(files: list[str]) -> list[Path]:
    """Paths in order; a glob pattern expands to its sorted matches."""
    paths: list[Path] = []
    for f in files:
        if any(ch in f for ch in "*?["):
            matches = sorted(glob.glob(f))
            if not matches:
                raise DataError(f"no data file matches {f}", "--data_files",
                                "check the pattern")
            paths += [Path(m) for m in matches if Path(m).is_file()]
            continue
        path = Path(f)
        if not path.exists():
            raise DataError(f"data file not found: {f}", "--data_files", _near_miss(path))
        if path.is_dir():
            raise DataError(f"{f} is a directory, not a data file", "--data_files",
                            "pass the files inside it, or --data_name DIR for a saved dataset")
        paths.append(path)
    return paths


def _near_miss(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"check the path ({parent} does not exist either)"
    names = [p.name for p in parent.iterdir() if p.is_file()]
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"did you mean {parent / close[0]}?" if close else f"check the path (in {parent})"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})", f"{path}:{line}",
                        "save the file as UTF-8") from None


def _read_json(path: Path) -> list[Record]:
    """JSON lines (one object per line), or one JSON array / object of records."""
    text = _read_text(path)
    head = text.lstrip()[:1]
    if head == "[":
        return _read_json_array(path, text)
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == 1 and head == "{":
                whole = _read_json_document(path, text)
                if whole is not None:
                    return whole
            raise DataError(f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})",
                            f"{path}:{number}",
                            "fix or remove that line: each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise DataError(f"line {number} is a JSON {type(value).__name__}, not an object",
                            f"{path}:{number}", 'make each line an object such as '
                            '{"prompt": "...", "response": "..."}')
        records.append(Record(value, f"{path}:{number}"))
    return records


def _read_json_document(path: Path, text: str) -> list[Record] | None:
    """A pretty-printed JSON object: one record, or {"key": [records]} as the HF loader allows."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    lists = [v for v in value.values() if isinstance(v, list) and v and
             all(isinstance(x, dict) for x in v)]
    if len(lists) == 1 and len(value) == 1:
        return [Record(x, f"{path}[item {i}]") for i, x in enumerate(lists[0], 1)]
    return [Record(value, f"{path}:1")]


def _read_json_array(path: Path, text: str) -> list[Record]:
    """A JSON array of objects, each record tagged with the line its object starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    records: list[Record] = []
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    try:
        if text[pos:pos + 1] == "]":
            return records
        while True:
            value, end = decoder.raw_decode(text, pos)
            number = line_at(pos)
            if not isinstance(value, dict):
                raise DataError(f"item {len(records) + 1} of the JSON array is a "
                                f"{type(value).__name__}, not an object", f"{path}:{number}",
                                "make every item an object with the columns as keys")
            records.append(Record(value, f"{path}:{number}"))
            pos = ws.match(text, end).end()
            if text[pos:pos + 1] == "]":
                break
            if text[pos:pos + 1] != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = ws.match(text, pos + 1).end()
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column "
                        f"{exc.colno})", f"{path}:{exc.lineno}", "fix the JSON there") from None
    if text[pos + 1:].strip():
        number = line_at(ws.match(text, pos + 1).end())
        raise DataError(f"{path} has text after the closing ] of its JSON array",
                        f"{path}:{number}", "remove it, or write one JSON object per line (.jsonl)")
    return records


def _read_csv(path: Path) -> list[Record]:
    """CSV with a header row; every value is a string (an empty field is kept as '').
    Strict parsing, so an unbalanced quote is an error at its row, not a silently
    swallowed rest of the file."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[Record] = []
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return records
        header = [h.strip() for h in header]
        if not any(header):
            raise DataError(f"{path} has an empty header row", f"{path}:1",
                            "put the column names on the first line")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise DataError(f"line {line} has {len(row)} fields but the header has "
                                f"{len(header)}", f"{path}:{line}",
                                "quote fields that contain commas, or fix that row")
            records.append(Record(dict(zip(header, row)), f"{path}:{line}"))
    except csv.Error as exc:
        raise DataError(f"{path} cannot be read as CSV ({exc}, in the row starting at line "
                        f"{start})", f"{path}:{start}",
                        "fix the CSV there (an unbalanced double quote is the usual cause)"
                        ) from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # ArrowInvalid, OSError: not a parquet file or a damaged one
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{path} cannot be read as parquet ({reason})", str(path),
                        "check that the file is a complete parquet file, or pass the right "
                        "--data_name") from None
    return [Record(row, f"{path}:row {i}") for i, row in enumerate(rows, 1)]


def _read_saved_dataset(directory: Path) -> list[Record]:
    """A `Dataset` or `DatasetDict` written by `save_to_disk`; of a dict, the train split."""
    try:
        import datasets
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise DataError(f"{directory} is not a dataset saved with save_to_disk ({reason})",
                        "--data_name", "pass a directory written by Dataset.save_to_disk, or "
                        "--data_name json|csv|parquet with --data_files") from None
    split = ""
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if "train" in loaded:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise DataError(f"{directory} holds the splits {', '.join(names)} and none is "
                            "'train'", "--data_name", "save the training split as 'train'")
        loaded = loaded[split]
    tag = f"{directory}[{split + ' ' if split else ''}row "
    return [Record(row, f"{tag}{i}]") for i, row in enumerate(loaded.to_list(), 1)]


# ---------------------------------------------------------------- validation

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
        _validate_messages(records, spec.messages_col, train_on_prompt)


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


def _validate_messages(records: Sequence[Record], column: str, train_on_prompt: bool) -> None:
    bad = [r for r in records if messages_of(r, column) is None]
    if bad:
        raise DataError(f"{len(bad)} of {len(records)} records have a '{column}' that is not a "
                        "non-empty list of {role, content} objects with string values, first at "
                        f"{bad[0].source}", bad[0].source,
                        f'write it as [{{"role": "user", "content": "..."}}, '
                        f'{{"role": "assistant", "content": "..."}}]')
    if not train_on_prompt and not any(m["role"] == "assistant" for r in records
                                       for m in messages_of(r, column)):
        raise DataError(f"no record has an assistant turn in '{column}', so there is nothing to "
                        "train on", _sources(records),
                        "add assistant replies, or pass --train_on_prompt to train on all text")


# ---------------------------------------------------------------- eval split

def _check_split_options(eval_split: float | None, eval_dataset_size: int | None) -> None:
    if eval_split is not None and eval_dataset_size is not None:
        raise OptionError("--eval_split and --eval_dataset_size are both given",
                          "--eval_split / --eval_dataset_size", "pass one of them")
    if eval_split is not None and not 0 < eval_split < 1:
        raise OptionError(f"--eval_split must be a fraction between 0 and 1 (got {eval_split})",
                          "--eval_split", "pass e.g. --eval_split 0.1")
    if eval_dataset_size is not None and (not isinstance(eval_dataset_size, int)
                                          or eval_dataset_size < 1):
        raise OptionError(f"--eval_dataset_size must be a positive integer (got "
                          f"{eval_dataset_size!r})", "--eval_dataset_size", "pass e.g. 20")


def split_records(records: Sequence[Record], eval_split: float | None = None,
                  eval_dataset_size: int | None = None, seed: int = 42
                  ) -> tuple[list[Record], list[Record]]:
    """Hold out an eval set: the same records for the same seed, whatever the machine.

    Both parts keep the file order (the trainer shuffles); the held-out records are chosen
    by a seeded shuffle of the indices.
    """
    _check_split_options(eval_split, eval_dataset_size)
    records = as_records(records)
    n = len(records)
    if eval_split is None and eval_dataset_size is None:
        return records, []
    n_eval = eval_dataset_size if eval_dataset_size is not None else max(1, round(n * eval_split))
    if n_eval >= n:
        option = "--eval_dataset_size" if eval_dataset_size is not None else "--eval_split"
        raise OptionError(f"holding out {n_eval} of {n} records leaves none to train on", option,
                          "hold out fewer records, or pass more data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


# ---------------------------------------------------------------- rendering

def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render(record: Record, spec: TextSpec, tokenizer=None) -> tuple[str, list[tuple[int, int]]]:
    """The record's training text, and the character spans the loss covers.

    A template's response is everything from where its LAST placeholder is substituted
    (for `<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>` that is
    `{response}<|end|>`); a chat record's are its assistant turns.
    """
    if spec.chat:
        return render_chat(messages_of(record, spec.messages_col), tokenizer)
    if spec.template is None:  # text columns alone: joined with newlines, the last is the response
        values = [_value_text(record.get(c)) for c in spec.text_cols]
        text = "\n".join(values)
        return text, [(len(text) - len(values[-1]), len(text))]
    out: list[str] = []
    length = start = 0
    for literal, name, conversion, fmt in _parse(spec.template):
        out.append(literal)
        length += len(literal)
        if name is None:
            continue
        if record.get(name) is None:
            raise DataError(f"the record has no '{name}'", record.source,
                            f"fill in '{name}' or remove the record")
        value = record[name]
        if conversion == "r":
            value = repr(value)
        elif conversion == "a":
            value = ascii(value)
        piece = format(value, fmt) if fmt else _value_text(value)
        start = length
        out.append(piece)
        length += len(piece)
    return "".join(out), [(start, length)]


def render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text for a conversation, and the spans of its assistant turns.

    An assistant turn starts after the generation prompt (rendering the turns before it with
    `add_generation_prompt=True` gives that prefix) and ends after its content plus the
    special token that closes it (`<|end|>` for Phi-3), so the model learns to stop.
    Templates that rewrite earlier turns fall back to finding the content in the text.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise OptionError("--use_chat_template needs a tokenizer with a chat template, and this "
                          "model's has none", "--use_chat_template",
                          "pass --text_template instead")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _generation_prefix(tokenizer, messages[:i])
        content = message["content"]
        if full.startswith(prefix) and len(prefix) >= cursor:
            start = len(prefix)
            at = full.find(content, start)
            if at < 0:  # the template changed the content (e.g. stripped it)
                at = full.find(content.strip(), start)
                content = content.strip()
        else:
            at = full.find(content, cursor)
            start = at
        if at < 0:
            continue
        end = _after_closing_token(full, at + len(content), specials)
        spans.append((start, end))
        cursor = end
    return full, spans


def _generation_prefix(tokenizer, messages: list[dict]) -> str:
    """The text before an assistant reply: the turns so far plus the generation prompt."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates refuse an empty conversation
        if messages:
            raise
        return ""


def _special_strings(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False)}
    found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((s for s in found if s), key=len, reverse=True)


def _after_closing_token(text: str, pos: int, specials: list[str]) -> int:
    """`pos` moved past the special token (after optional spaces) that closes a turn there."""
    skip = len(text[pos:]) - len(text[pos:].lstrip(" "))
    for token in specials:
        if text.startswith(token, pos + skip):
            return pos + skip + len(token)
    return pos


# ---------------------------------------------------------------- tokenizing

@dataclass
class Overflow:
    """What happened to examples over `max_seq_len` and to examples with nothing to learn."""

    n_truncated: int = 0
    n_dropped: int = 0
    n_no_target: int = 0  # dropped: no token left to train on (e.g. the response was cut off)


def tokenize_examples(records: Sequence[Record], tokenizer, spec: TextSpec, max_seq_len: int,
                      overflow: str = "truncate", train_on_prompt: bool = False,
                      batch_size: int = 512) -> tuple[list[dict], Overflow]:
    """Render and tokenize each record once, with labels that train only the response.

    The whole text is tokenized in one go (so training sees exactly the tokens inference
    sees) and a token is trained when its characters overlap a response span; a token
    straddling the boundary counts as response. The first token's label is always masked:
    nothing in its own example predicts it, and in a packed row it would otherwise be the
    target of the previous example's last token. Examples left with no trained token are
    dropped and counted.
    """
    validate_options(max_seq_len, overflow)
    examples: list[dict] = []
    counts = Overflow()
    records = as_records(records)
    for lo in range(0, len(records), batch_size):
        chunk = records[lo:lo + batch_size]
        rendered = [render(r, spec, tokenizer) for r in chunk]
        texts = [text for text, _ in rendered]
        encoded = tokenizer(texts, add_special_tokens=not spec.chat,
                            return_offsets_mapping=True)
        for (text, spans), ids, offsets in zip(rendered, encoded["input_ids"],
                                               encoded["offset_mapping"]):
            if train_on_prompt:
                spans = [(0, len(text))]
            labels = _labels(ids, offsets, spans, len(text))
            if len(ids) > max_seq_len:
                if overflow == "drop":
                    counts.n_dropped += 1
                    continue
                counts.n_truncated += 1
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if labels:
                labels[0] = IGNORE_INDEX
            if all(label == IGNORE_INDEX for label in labels):
                counts.n_no_target += 1
                continue
            examples.append({"input_ids": list(ids), "labels": labels})
    if not examples:
        why = [f"{counts.n_dropped} dropped as longer than {max_seq_len} tokens"
               if counts.n_dropped else "",
               f"{counts.n_no_target} with no response token left" if counts.n_no_target else ""]
        raise DataError(f"no example is left to train on ({'; '.join(w for w in why if w)})",
                        "--max_seq_len", "raise --max_seq_len, pass --overflow truncate, or "
                        "check that the response column is not empty")
    return examples, counts


def _labels(ids: Sequence[int], offsets: Sequence[Sequence[int]], spans: list[tuple[int, int]],
            text_len: int) -> list[int]:
    """Token ids where a token overlaps a trained span, IGNORE_INDEX elsewhere.

    Tokens the tokenizer adds itself carry the offsets (0, 0): a leading BOS is prompt, a
    trailing EOS is trained when the text's end is.
    """
    spans = [(a, b) for a, b in spans if b > a]
    real = [i for i, (s, e) in enumerate(offsets) if e > s]
    last_real = real[-1] if real else -1
    end_trained = any(a < text_len <= b for a, b in spans)
    labels = []
    for i, (token, (s, e)) in enumerate(zip(ids, offsets)):
        if e > s:
            trained = any(s < b and e > a for a, b in spans)
        else:
            trained = i > last_real and end_trained
        labels.append(token if trained else IGNORE_INDEX)
    return labels


# ---------------------------------------------------------------- packing

def pack(examples: Sequence[dict], max_seq_len: int, pad_id: int = 0) -> list[dict]:
    """Whole examples packed into rows of exactly `max_seq_len` tokens (best-fit decreasing).

    Each row has `input_ids`, `labels`, `position_ids` (restarting at 0 for every example),
    `seq_ids` (the example's index within the row, -1 for padding) and `lengths`, from
    which `block_causal_mask` keeps the examples from seeing each other. The order is
    deterministic; the trainer shuffles rows.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        size = len(examples[i]["input_ids"])
        if size > max_seq_len:
            raise ValueError(f"example of {size} tokens is longer than max_seq_len={max_seq_len}; "
                             "tokenize_examples handles overflow")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            if space - size:
                bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            if max_seq_len - size:
                bisect.insort(free, (max_seq_len - size, len(bins) - 1))
    return [_row([examples[i] for i in members], max_seq_len, pad_id) for members in bins]


def _row(members: list[dict], max_seq_len: int, pad_id: int) -> dict:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [],
                                 "seq_ids": [], "lengths": []}
    for k, ex in enumerate(members):
        n = len(ex["input_ids"])
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += range(n)
        row["seq_ids"] += [k] * n
        row["lengths"].append(n)
    pad = max_seq_len - len(row["input_ids"])
    row["input_ids"] += [pad_id] * pad
    row["labels"] += [IGNORE_INDEX] * pad
    row["position_ids"] += [0] * pad
    row["seq_ids"] += [-1] * pad
    return row


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (padding is never attended)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def block_causal_mask(seq_ids):
    """A [batch, 1, seq, seq] boolean mask, True where query i may attend to key j:
    same example and j <= i. Padding (seq id -1) attends only to itself, so no query row is
    empty (an all-blocked row would turn softmax into NaN or noise)."""
    import torch
    seq_ids = torch.as_tensor(seq_ids)
    if seq_ids.dim() == 1:
        seq_ids = seq_ids.unsqueeze(0)
    n = seq_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device).tril()
    same = seq_ids.unsqueeze(-1) == seq_ids.unsqueeze(-2)
    real = (seq_ids >= 0).unsqueeze(-1)
    eye = torch.eye(n, dtype=torch.bool, device=seq_ids.device)
    return ((same & real & causal) | eye).unsqueeze(1)


def additive_mask(mask, dtype=None):
    """A boolean mask as the float mask HF attention adds to its scores: 0 where allowed,
    the dtype's most negative value where blocked."""
    import torch
    if dtype is None or not dtype.is_floating_point:  # e.g. an int4 model's first parameter
        dtype = torch.float32
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


def collate_packed(rows: Sequence[dict], dtype=None, mask: str = "4d") -> dict:
    """Packed rows as tensors for a HF causal LM forward.

    `mask="4d"` adds `attention_mask` [batch, 1, seq, seq] in `dtype` (use the model's
    compute dtype), which eager and sdpa attention use as given. `mask="none"` leaves it out:
    transformers then infers the packing from the restarting `position_ids` (flash
    attention's varlen path, or its own block mask), which saves the seq² memory. That
    inference only happens without a KV cache, so that batch carries `use_cache=False`.
    """
    import torch
    if mask not in ("4d", "none"):
        raise ValueError(f"mask must be '4d' or 'none', not {mask!r}")
    lengths = {len(r["input_ids"]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"packed rows differ in length ({sorted(lengths)}); pack() makes them equal")
    batch = {key: torch.tensor([r[key] for r in rows], dtype=torch.long)
             for key in ("input_ids", "labels", "position_ids")}
    if mask == "4d":
        seq_ids = torch.tensor([r["seq_ids"] for r in rows], dtype=torch.long)
        batch["attention_mask"] = additive_mask(block_causal_mask(seq_ids), dtype)
    else:
        batch["use_cache"] = False
    return batch


def pad_batch(examples: Sequence[dict], pad_id: int = 0, pad_to_multiple_of: int | None = None
              ) -> dict:
    """The unpacked baseline: right-pad a batch to its longest example, with the usual 2D
    attention mask (1 for tokens, 0 for padding)."""
    import torch
    longest = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids, labels, attn = [], [], []
    for e in examples:
        pad = longest - len(e["input_ids"])
        ids.append(list(e["input_ids"]) + [pad_id] * pad)
        labels.append(list(e["labels"]) + [IGNORE_INDEX] * pad)
        attn.append([1] * len(e["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attn, dtype=torch.long)}


# ---------------------------------------------------------------- the whole pipeline

@dataclass
class Prepared:
    """Training and eval rows (packed rows, or examples when packing is off) and the figures
    the caller prints and stores in the manifest."""

    train: list[dict]
    eval: list[dict]
    stats: dict = field(default_factory=dict)


def prepare(records: Sequence[Record], tokenizer, spec: TextSpec, max_seq_len: int = 1024,
            overflow: str = "truncate", train_on_prompt: bool = False,
            eval_split: float | None = None, eval_dataset_size: int | None = None,
            seed: int = 42, packing: bool = True) -> Prepared:
    """Split, tokenize, mask and (by default) pack validated records; count everything."""
    validate_options(max_seq_len, overflow, eval_split, eval_dataset_size)
    train_records, eval_records = split_records(records, eval_split, eval_dataset_size, seed)
    train_ex, counts = tokenize_examples(train_records, tokenizer, spec, max_seq_len, overflow,
                                         train_on_prompt)
    eval_ex: list[dict] = []
    if eval_records:
        try:
            eval_ex, _ = tokenize_examples(eval_records, tokenizer, spec, max_seq_len, overflow,
                                           train_on_prompt)
        except DataError:  # an eval set with nothing trainable only loses the eval figures
            eval_ex = []
    pad = pad_id_of(tokenizer)
    train_rows = pack(train_ex, max_seq_len, pad) if packing else train_ex
    eval_rows = pack(eval_ex, max_seq_len, pad) if packing else eval_ex
    n_tokens = sum(len(e["input_ids"]) for e in train_ex)
    stats = {
        "n_records": len(records), "n_train": len(train_records), "n_eval": len(eval_records),
        **asdict(counts),
        "n_train_examples": len(train_ex), "n_eval_examples": len(eval_ex),
        "n_tokens": n_tokens,
        "n_trained_tokens": sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX)
                                for e in train_ex),
        "max_seq_len": max_seq_len, "packing": packing,
        "n_rows": len(train_rows), "n_eval_rows": len(eval_rows),
        "padding_fraction": (round(1 - n_tokens / (len(train_rows) * max_seq_len), 4)
                             if packing and train_rows else None),
    }
    return Prepared(train_rows, eval_rows, stats)


def describe(stats: dict) -> list[str]:
    """The statistics as short lines for the caller to print."""
    lines = [f"{stats['n_records']} records: {stats['n_train']} train, {stats['n_eval']} eval",
             f"{stats['n_tokens']} tokens, {stats['n_trained_tokens']} trained on"]
    over = [f"{stats[k]} {w}" for k, w in (("n_truncated", "truncated"), ("n_dropped", "dropped"),
                                           ("n_no_target", "dropped with nothing to train on"))
            if stats.get(k)]
    if over:
        lines.append(f"longer than {stats['max_seq_len']} tokens or empty: " + ", ".join(over))
    if stats.get("packing"):
        lines.append(f"{stats['n_rows']} packed rows of {stats['max_seq_len']} tokens, "
                     f"{stats['padding_fraction']:.1%} padding")
    return lines
