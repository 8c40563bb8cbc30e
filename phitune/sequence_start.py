"""What starts every sequence phitune feeds a model: what the model's own tokenizer adds by
default, asked of the tokenizer itself, never looked up by model family.

Gemma's and Llama-2/3-style tokenizers put a BOS token before every text (their tokenizer.json
post-processor says so); tiny-phi3's and SmolLM2's put nothing. A model trained with a BOS
answers garbage without it (issue 33: a Gemma 3's perplexity 88.5 without, 22.6 with).

phitune tokenizes every text without special tokens and puts this start before it itself,
once: calibration blocks, perplexity windows, finetune and eval records, and the prompts of
infer, serve and eval's latency runs. A text that already begins with it (a chat template
that writes `{{ bos_token }}`) is not given a second. Training records also end as the
tokenizer ends a text by default (`end_ids`: nothing for all the tokenizers above); a prompt
never does, since the answer follows it.

onnxruntime-genai's tokenizer adds no start token (0.18, measured on Gemma 3 and on a
post-processor that adds `<bos>`), and importing transformers to ask costs seconds at every
`infer` start, so auto-opt asks once and records the answer beside the graph (FILE), with the
digests of the tokenizer files it was read from; `infer`, `serve` and eval read that record,
and a dir whose record is missing or no longer matches its tokenizer files is asked through
transformers instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Enters the keys of every output whose data it shapes (quantize's calibration and perplexity,
# finetune's records, auto-opt's record, eval's figures): outputs made before the rule existed
# are not up to date. Bump it when what this module decides changes.
RULE = "tokenizer-default/1"
FILE = "sequence_start.json"
# The tokenizer files the answer depends on (auto-opt's record holds their digests).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json")
_PROBE = "Hello world"  # any text: what matters is what the tokenizer adds around it


@dataclass(frozen=True)
class SequenceStart:
    """The tokens the model's tokenizer puts before a text (`ids`, `tokens`), and after a
    text (`end_ids`; only training records use them), by default."""

    ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    end_ids: tuple[int, ...] = ()

    def apply(self, ids: Sequence[int]) -> list[int]:
        """`ids` as the model sees a sequence: the start once, then the rest. Ids that already
        begin with it (a template wrote it) are left as they are."""
        ids = [int(t) for t in ids]
        if not self.ids or ids[:len(self.ids)] == list(self.ids):
            return ids
        return [*self.ids, *ids]

    def added(self, ids: Sequence[int]) -> int:
        """How many start tokens `apply` puts before `ids` (0 or len(self.ids))."""
        return len(self.apply(ids)) - len(ids)

    def end(self, ids: Sequence[int]) -> list[int]:
        """The end tokens a training record gets after `ids` (none if it already ends so)."""
        if not self.end_ids or list(ids[-len(self.end_ids):]) == list(self.end_ids):
            return []
        return list(self.end_ids)

    def encode(self, tokenizer, text: str) -> list[int]:
        """A Hugging Face tokenizer's ids for `text`, started as the model's sequences start."""
        return self.apply(tokenizer(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> str:
        """For manifests and metrics: which start applied."""
        if not self.ids:
            return "none (the tokenizer adds no start token)"
        return " ".join(f"{t} (id {i})" for t, i in zip(self.tokens, self.ids))

    def as_record(self) -> dict:
        return {"ids": list(self.ids), "tokens": list(self.tokens),
                "end_ids": list(self.end_ids)}


def of_tokenizer(tokenizer) -> SequenceStart:
    """Ask a Hugging Face tokenizer what it adds to a text by default: encode one with and
    without special tokens, and keep what comes before and after the text's own ids."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    at = next((i for i in range(len(full) - len(plain) + 1)
               if full[i:i + len(plain)] == plain), None)
    if at is None:  # the special tokens changed the text's own ids: keep the special ones
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        at = next((i for i, t in enumerate(full) if t not in special), len(full))
        plain = full[at:]
        while plain and plain[-1] in special:
            plain = plain[:-1]
    start, end = full[:at], full[at + len(plain):]
    tokens = tokenizer.convert_ids_to_tokens(start) if start else []
    return SequenceStart(tuple(int(t) for t in start), tuple(str(t) for t in tokens),
                         tuple(int(t) for t in end))


def of_files(model_dir: Path | str) -> SequenceStart:
    """The rule for a model dir, asked of its tokenizer as transformers loads it."""
    from phitune.models import load_tokenizer
    return of_tokenizer(load_tokenizer(model_dir))


# ---------------------------------------------------------------- the record in an ONNX dir

def _digests(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
            for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def record(model_dir: Path | str, start: SequenceStart | None = None) -> SequenceStart:
    """Write the rule of `model_dir`'s tokenizer files beside them (FILE); returns it."""
    model_dir = Path(model_dir)
    start = start or of_files(model_dir)
    body = {"rule": RULE, **start.as_record(), "tokenizer_files": _digests(model_dir)}
    (model_dir / FILE).write_text(json.dumps(body, indent=1) + "\n")
    return start


def of_model_dir(model_dir: Path | str, tokenizer=None) -> SequenceStart:
    """The rule for an onnxruntime-genai dir: its record when that matches its tokenizer files,
    else asked of `tokenizer` (a Hugging Face one already loaded) or of its files."""
    from phitune import ui
    model_dir = Path(model_dir)
    try:
        body = json.loads((model_dir / FILE).read_text())
        if body.get("rule") == RULE and body.get("tokenizer_files") == _digests(model_dir):
            return SequenceStart(tuple(body["ids"]), tuple(body["tokens"]),
                                 tuple(body.get("end_ids", ())))
        reason = "its tokenizer files changed since it was written"
    except FileNotFoundError:
        reason = f"no {FILE} (exported before phitune recorded it, or by another tool)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = f"{FILE} is unreadable ({exc})"
    ui.debug(f"{model_dir}: asking the tokenizer what starts a sequence: {reason}")
    return of_tokenizer(tokenizer) if tokenizer is not None else of_files(model_dir)
