"""The eval hold-out: the same records for the same seed, whatever the machine."""

from __future__ import annotations

import random
from typing import Sequence

from phitune.data.records import Record, as_records
from phitune.errors import OptionError


def check_split_options(eval_split: float | None, eval_dataset_size: int | None) -> None:
    from phitune import options
    from phitune.data.records import RecordOptions
    options.check_field(RecordOptions, "eval_split", eval_split)  # the declared ranges
    options.check_field(RecordOptions, "eval_dataset_size", eval_dataset_size)
    if eval_split is not None and eval_dataset_size is not None:
        raise OptionError("--eval_split and --eval_dataset_size are both given",
                          "--eval_split / --eval_dataset_size", "pass one of them")


def split_records(records: Sequence[Record], eval_split: float | None = None,
                  eval_dataset_size: int | None = None, seed: int = 42
                  ) -> tuple[list[Record], list[Record]]:
    """Hold out an eval set: the same records for the same seed, whatever the machine.

    Both parts keep the file order (the trainer shuffles); the held-out records are chosen
    by a seeded shuffle of the indices.
    """
    check_split_options(eval_split, eval_dataset_size)
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
