"""Packing whole examples into full rows, and the tensors a causal LM forward takes: packed
rows with a block-diagonal causal mask, or the padded baseline. torch is imported only here,
and only when tensors are made."""

from __future__ import annotations

import bisect
from typing import Sequence

from phitune.data.tokens import IGNORE_INDEX


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
