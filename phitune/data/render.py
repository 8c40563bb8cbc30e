"""A record as training text, with the character spans the loss covers (the response, or a
chat's assistant turns)."""

from __future__ import annotations

import json
from typing import Any

from phitune.data.records import Record
from phitune.data.spec import TextSpec, _parse
from phitune.data.validate import conversation
from phitune.errors import DataError, OptionError


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
        return render_chat(conversation(record, spec), tokenizer)
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
