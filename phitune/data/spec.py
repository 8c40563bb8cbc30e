"""The text spec: how a record becomes training text (a `--text_template` with `{column}`
placeholders, `--text_cols`, or the tokenizer's chat template), checked with the other data
options before any file or model is read."""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from typing import Sequence

from phitune.data.split import check_split_options
from phitune.errors import OptionError

OVERFLOW = ("truncate", "drop")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


@dataclass(frozen=True)
class TextSpec:
    """How a record becomes training text: a template, text columns, or the chat template."""

    template: str | None = None  # already unescaped: real newlines and tabs; None: join cols
    text_cols: tuple[str, ...] = ()
    chat: bool = False
    messages_col: str = "messages"
    # Chat from plain columns: (user, assistant) or (system, user, assistant) column names.
    turn_cols: tuple[str, ...] = ()
    # Chat with no column named: a 'messages' list, else the first CHAT_COLUMN_PAIRS pair a
    # record has (decided per record, so the spec needs no look at the data).
    auto_columns: bool = False
    option: str = "--text_template"  # the option to name when the data does not fit

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns every record needs."""
        if self.chat:
            if self.auto_columns:
                return ()
            return self.turn_cols or (self.messages_col,)
        return tuple(dict.fromkeys([*placeholders(self.template), *self.text_cols]))


# Column pairs that `--use_chat_template` reads as a user turn and an assistant turn when no
# column is named and a record has no 'messages' list (the common instruction-data layouts).
CHAT_COLUMN_PAIRS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"))
CHAT_ROLES = ("system", "user", "assistant")


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
    `use_chat_template`, one text column names the messages column; two name the user and
    assistant columns (three: system, user, assistant), rendered with the model's template.
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
        if len(cols) > len(CHAT_ROLES):
            raise OptionError(f"--use_chat_template reads at most {len(CHAT_ROLES)} columns, "
                              f"--text_cols names {len(cols)}", "--text_cols",
                              "name one messages column, or PROMPT,RESPONSE (or "
                              "SYSTEM,PROMPT,RESPONSE) columns")
        if len(cols) > 1:
            return TextSpec(chat=True, turn_cols=cols, text_cols=cols, option="--text_cols")
        return TextSpec(chat=True, messages_col=cols[0] if cols else "messages", text_cols=cols,
                        auto_columns=not cols,
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
    """The numeric data options, checked before any file or model is read (their ranges as
    declared on RecordOptions' fields)."""
    from phitune import options
    from phitune.data.records import RecordOptions
    options.check_field(RecordOptions, "max_seq_len", max_seq_len)
    if overflow not in OVERFLOW:
        raise OptionError(f"unknown overflow policy '{overflow}'", "--overflow",
                          "pass --overflow truncate or --overflow drop")
    check_split_options(eval_split, eval_dataset_size)
