"""Fine-tuning data: read, validate, render, tokenize, mask, pack — one module per stage.

The flow, in the order `phitune finetune` runs it:

1. `make_spec` and `validate_options` (spec.py) check the options, and `load_and_validate`
   (validate.py, reading through readers.py) reads the records and checks them against the
   spec — before any model loads, and without importing torch or transformers, so a typo
   costs a second, not a model load;
2. `split_records` (split.py) holds out an eval set, deterministically;
3. `tokenize_examples` (tokens.py) renders each record (render.py: a text template, text
   columns or the tokenizer's chat template), tokenizes it once and masks the labels of
   everything but the response;
4. `pack` (packing.py) fills rows of exactly `max_seq_len` tokens with whole examples, and
   `collate_packed` turns rows into tensors with a block-diagonal causal mask so that the
   examples sharing a row never see each other; `pad_batch` is the unpacked baseline.

`prepare` (prepare.py) runs 2–4 and returns the statistics the caller prints and stores in
the manifest. Every record remembers where it came from (`Record.source`, e.g.
`data/x.jsonl:17`), so errors name the file and line.
"""

from phitune.data.packing import (additive_mask, block_causal_mask, collate_packed, pack,
                                  pad_batch, pad_id_of)
from phitune.data.prepare import Prepared, describe, prepare
from phitune.data.readers import FORMATS, SUFFIXES, load_records
from phitune.data.records import Record, RecordOptions, as_records
from phitune.data.render import render, render_chat
from phitune.data.spec import OVERFLOW, TextSpec, make_spec, placeholders, unescape, validate_options
from phitune.data.split import split_records
from phitune.data.tokens import IGNORE_INDEX, Overflow, tokenize_examples
from phitune.data.validate import conversation, load_and_validate, messages_of, validate_records

__all__ = [
    "FORMATS", "IGNORE_INDEX", "OVERFLOW", "SUFFIXES", "Overflow", "Prepared", "Record",
    "RecordOptions", "TextSpec", "additive_mask", "as_records", "block_causal_mask",
    "collate_packed", "conversation", "describe", "load_and_validate", "load_records", "make_spec",
    "messages_of", "pack", "pad_batch", "pad_id_of", "placeholders", "prepare", "render",
    "render_chat", "split_records", "tokenize_examples", "unescape", "validate_options",
    "validate_records",
]
