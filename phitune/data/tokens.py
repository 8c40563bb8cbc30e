"""Tokenizing rendered records once, with labels that train only the response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from phitune.data.records import Record, as_records
from phitune.data.render import render
from phitune.data.spec import TextSpec, validate_options
from phitune.errors import DataError

IGNORE_INDEX = -100  # label of a token that is not trained on (the loss skips it)


@dataclass
class Overflow:
    """What happened to examples over `max_seq_len` and to examples with nothing to learn."""

    n_truncated: int = 0
    n_dropped: int = 0
    n_no_target: int = 0  # dropped: no token left to train on (e.g. the response was cut off)


def tokenize_examples(records: Sequence[Record], tokenizer, spec: TextSpec, max_seq_len: int,
                      overflow: str = "truncate", train_on_prompt: bool = False,
                      batch_size: int = 512, start=None) -> tuple[list[dict], Overflow]:
    """Render and tokenize each record once, with labels that train only the response.

    The whole text is tokenized in one go (so training sees exactly the tokens inference
    sees) and a token is trained when its characters overlap a response span; a token
    straddling the boundary counts as response. Every example starts as the model's
    sequences start (`start`, default: asked of the tokenizer; a chat template that writes
    the BOS gets no second one); a text-template record also ends as the tokenizer ends a
    text by default (usually with nothing), a chat's ends are its template's. The first
    token's label is always masked:
    nothing in its own example predicts it, and in a packed row it would otherwise be the
    target of the previous example's last token. Examples left with no trained token are
    dropped and counted.
    """
    validate_options(max_seq_len, overflow)
    from phitune.sequence_start import of_tokenizer
    start = start if start is not None else of_tokenizer(tokenizer)
    examples: list[dict] = []
    counts = Overflow()
    records = as_records(records)
    for lo in range(0, len(records), batch_size):
        chunk = records[lo:lo + batch_size]
        rendered = [render(r, spec, tokenizer) for r in chunk]
        texts = [text for text, _ in rendered]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for (text, spans), ids, offsets in zip(rendered, encoded["input_ids"],
                                               encoded["offset_mapping"]):
            ids, offsets = _framed(start, ids, offsets, not spec.chat)
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


def _framed(start, ids: Sequence[int], offsets: Sequence[Sequence[int]], end: bool):
    """The ids with the model's start before them (and, for `end`, the tokenizer's default end
    after them), as added tokens: offsets (0, 0)."""
    head = list(start.ids)[:start.added(ids)]
    tail = start.end(ids) if end else []
    return ([*head, *ids, *tail],
            [(0, 0)] * len(head) + [tuple(o) for o in offsets] + [(0, 0)] * len(tail))


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
