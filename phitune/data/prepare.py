"""The whole pipeline after validation: split, tokenize, mask, pack, and count it all."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from phitune.data.packing import pack, pad_id_of
from phitune.data.records import Record
from phitune.data.spec import TextSpec, validate_options
from phitune.data.split import split_records
from phitune.data.tokens import IGNORE_INDEX, tokenize_examples
from phitune.errors import DataError
from phitune.sequence_start import of_tokenizer


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
    start = of_tokenizer(tokenizer)
    train_ex, counts = tokenize_examples(train_records, tokenizer, spec, max_seq_len, overflow,
                                         train_on_prompt, start=start)
    eval_ex: list[dict] = []
    if eval_records:
        try:
            eval_ex, _ = tokenize_examples(eval_records, tokenizer, spec, max_seq_len, overflow,
                                           train_on_prompt, start=start)
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
        "max_seq_len": max_seq_len, "packing": packing, "sequence_start": start.describe(),
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
