"""Reading records from json/jsonl, csv, parquet files or a saved dataset directory.

json/jsonl and CSV are parsed here, line by line, so a malformed line is reported as
file:line; parquet goes through pyarrow, a saved dataset through `datasets.load_from_disk`.
"""

from __future__ import annotations

import csv
import difflib
import glob
import io
import json
import re
from pathlib import Path
from typing import Sequence

from phitune import inputfiles
from phitune.data.records import Record
from phitune.errors import DataError, OptionError, first_line

FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}


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
        paths.append(inputfiles.check_regular(path, "--data_files", DataError))
    return paths


def _near_miss(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"check the path ({parent} does not exist either)"
    names = [p.name for p in parent.iterdir() if p.is_file()]
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"did you mean {parent / close[0]}?" if close else f"check the path (in {parent})"


def _read_text(path: Path) -> str:
    data = inputfiles.read_bytes(path, "--data_files", DataError)
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
        except RecursionError:
            raise _too_deep(path, number) from None
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


def _too_deep(path: Path, number: int) -> DataError:
    return DataError(f"line {number} nests arrays or objects too deeply to read",
                     f"{path}:{number}", "a record is an object of text columns: fix that line")


def _read_json_document(path: Path, text: str) -> list[Record] | None:
    """A pretty-printed JSON object: one record, or {"key": [records]} as the HF loader allows."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
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
    except RecursionError:  # the decoder recurses once per level of nesting
        raise _too_deep(path, line_at(pos)) from None
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
        reason = first_line(exc, 160)
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
        reason = first_line(exc, 160)
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
