"""Calibration text: read, validate and cut into equal-length token blocks."""

from __future__ import annotations

import json
from pathlib import Path

from phitune import inputfiles
from phitune.errors import DataError


def read_texts(path: Path, option: str = "--calib_data") -> list[str]:
    """Documents from a .jsonl/.json file with a `text` field, or a .txt file as one document
    (paragraph breaks are text, not document ends: no EOS is inserted between them)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration file not found: {path}", option,
                        "pass an existing .txt or .jsonl file")
    raw = inputfiles.read_text(path, option, DataError, errors="replace")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise DataError(f"line {number} is not a JSON object with a 'text' field",
                                f"{path}:{number}", "fix that line or pass a .txt file") from None
    else:
        texts = [raw.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration file {path} has no text", option,
                        "pass a file with some text in it")
    return texts


def token_blocks(texts: list[str], tokenizer, n_samples: int, seq_len: int, start=None):
    """`n_samples` blocks of `seq_len` tokens from the concatenated documents, spread over
    the whole file so that calibration sees its variety, not only its start. Each block
    starts as the model's sequences start (`start`, default: asked of the tokenizer; e.g.
    BOS then text), so AWQ sees the activations the model has in use."""
    import torch

    from phitune.sequence_start import of_tokenizer
    start = start if start is not None else of_tokenizer(tokenizer)
    head = list(start.ids)
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
    width = seq_len - len(head)  # text tokens per block
    available = len(ids) // width if width > 0 else 0
    if available == 0:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than one block of "
                        f"{seq_len}", "--calib_data", "pass more text or a smaller --calib_seq_len")
    text = torch.tensor(ids[:available * width]).view(available, width)
    blocks = torch.cat([torch.tensor(head, dtype=text.dtype).expand(available, len(head)), text],
                       dim=1)
    if available > n_samples:
        index = torch.linspace(0, available - 1, n_samples).round().long()
        blocks = blocks[index]
    return blocks
