"""What `phitune eval` scores: its options checked together, the records (as finetune holds
them out) or the plain text, the records as scored examples, and the shape of the latency run.
Shared by the step and both runtimes (`torch_model.py`, `onnx_model.py`)."""

from __future__ import annotations

from pathlib import Path

from phitune import inputfiles
from phitune.artifacts.embedded import heldout_text
from phitune.errors import DataError, OptionError
from phitune.eval.options import EvalOptions

PREFILL_TOKENS = 128
DECODE_TOKENS = 16
RECORD_OPTIONS = ("text_template", "text_cols", "use_chat_template", "train_on_prompt",
                  "eval_split", "eval_dataset_size")


def check_options(opts: EvalOptions, files: tuple[str, ...]) -> bool:
    """Options alone and together, before any file or model is read; True for records."""
    records_mode = bool(files or opts.data_name)
    if records_mode and opts.text_file:
        raise OptionError("--text_file and --data_files/--data_name are both given",
                          "phitune eval", "pass one: plain text for perplexity, or records "
                          "for the response loss finetune reports")
    if not records_mode:
        given = [name for name in RECORD_OPTIONS if getattr(opts, name) not in (None, False)]
        if given:
            raise OptionError(f"--{given[0]} applies to records, and no --data_files or "
                              "--data_name is given", f"--{given[0]}",
                              "pass the records with --data_files FILE --data_name json, or drop "
                              f"--{given[0]}")
    if opts.adapter and opts.no_adapter:
        raise OptionError("--adapter and --no-adapter contradict each other", "phitune eval",
                          "pass one of them")
    if opts.max_latency_ms is not None and not opts.latency:
        raise OptionError("--max_latency_ms needs the latency measurement that --no-latency skips",
                          "--max_latency_ms / --no-latency", "drop one of them")
    return records_mode


def records(opts: EvalOptions, files: tuple[str, ...]):
    """The records to score: all of them, or the ones finetune holds out for the same split
    options and seed (`data.split_records`)."""
    from phitune import data
    spec = data.make_spec(opts.text_template, opts.text_cols, opts.use_chat_template)
    data.validate_options(opts.max_seq_len, opts.overflow, opts.eval_split, opts.eval_dataset_size)
    records = data.load_and_validate(list(files), opts.data_name, spec,
                                     train_on_prompt=opts.train_on_prompt)
    source = ", ".join(files) if files else str(opts.data_name)
    if opts.eval_split is None and opts.eval_dataset_size is None:
        return source, records, spec, f"all {len(records)}"
    _, held = data.split_records(records, opts.eval_split, opts.eval_dataset_size, opts.seed)
    how = (f"--eval_split {opts.eval_split:g}" if opts.eval_split is not None
           else f"--eval_dataset_size {opts.eval_dataset_size}")
    return source, held, spec, f"{len(held)} of {len(records)} held out ({how}, --seed {opts.seed})"


def texts(opts: EvalOptions) -> tuple[str, list[str]]:
    from phitune.quantize.calib import read_texts
    path = Path(opts.text_file).expanduser() if opts.text_file else heldout_text()
    if not path.exists():
        raise DataError(f"text file not found: {path}", "--text_file",
                        "pass an existing .txt file (one document) or .jsonl with a 'text' field")
    inputfiles.check_regular(path, "--text_file", DataError)
    try:
        return str(path), read_texts(path, "--text_file")
    except DataError as exc:
        raise DataError(exc.what.replace("calibration file", "text file"),
                        exc.where if ":" in (exc.where or "") else "--text_file", exc.fix) from None


def examples(held, spec, tokenizer, opts: EvalOptions, start) -> list[dict]:
    from phitune import data
    try:
        examples, _ = data.tokenize_examples(held, tokenizer, spec, opts.max_seq_len,
                                             opts.overflow, opts.train_on_prompt, start=start)
    except DataError as exc:
        raise DataError(f"no record has a response token to score ({exc.what.split('(', 1)[-1]}",
                        "--max_seq_len", "raise --max_seq_len, pass --overflow truncate, or check "
                        "that the response column is not empty") from None
    return examples


def scored(examples: list[dict]) -> int:
    from phitune.data import IGNORE_INDEX
    return sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in examples)
