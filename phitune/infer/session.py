"""One onnxruntime-genai model with its tokenizer and adapters, loaded once; generation with
streaming and timings.

An answer in progress is a `Decoding`: its own generator (its own KV cache and adapter),
advanced one token at a time. `phitune infer` runs one to the end; `phitune serve` interleaves
several, each with its own adapter, on the one loaded model.

A chat keeps its generator between turns, so a turn prefills only the tokens the conversation
gained since the last answer, not the whole history. The kept KV cache is reused only for
the prompt prefix it already holds, under the same adapter and search options; anything else
(an adapter switch, a conversation that outgrew the cache) starts a fresh generator, so two
adapters never mix in one cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from phitune import genai_config, hugepages, sequence_start, ui
from phitune.errors import InputError, OptionError, first_line
from phitune.infer.adapters import Adapter, check_fits, describe
from phitune.infer.options import Sampling


@dataclass
class Answer:
    text: str
    ids: list[int]  # every generated token, the closing end-of-sequence token included
    tokens: int  # tokens in the answer (a closing end-of-sequence token not counted)
    ttft_s: float  # start to the first generated token: prefill included
    tok_per_s: float | None  # decode speed after the first token; None with fewer than two
    interrupted: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the kept KV cache, not prefilled

    def summary(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "ttft_s": round(self.ttft_s, 6),
                "tok_per_s": None if self.tok_per_s is None else round(self.tok_per_s, 3)}


@dataclass
class _KeptGenerator:
    """A chat's generator between turns, with what its KV cache is valid for."""

    generator: object
    adapter: str | None
    search: dict
    capacity: int  # its max_length: the KV cache is allocated for this many tokens


# A kept chat cache holds at least this many tokens (Phi-3-mini's fp32 KV cache: 0.8 GB),
# and grows by at most CHAT_CACHE_GROWTH at a time (3.2 GB), whatever the context length.
CHAT_CACHE_TOKENS = 1024
CHAT_CACHE_GROWTH = 4096


def _capacity(needed: int, context_length: int) -> int:
    """Tokens to allocate a kept chat's KV cache for: room for a few more turns, doubling
    as the chat grows (so a long chat re-prefills once per doubling, not per turn), in
    steps of at most CHAT_CACHE_GROWTH so a 128k-context model does not reserve twice a
    long conversation."""
    headroom = min(needed, CHAT_CACHE_GROWTH)
    return min(max(needed + headroom, CHAT_CACHE_TOKENS), context_length)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class Session:
    """The model, tokenizer and loaded adapters, and which adapter is active (None: base)."""

    def __init__(self, model_dir: Path, adapters: Sequence[Adapter] = (),
                 active: str | None = None, weights: bool = True):
        """With `weights` False only the tokenizer and chat template load (og reads them from
        the config, not the model): `phitune serve` runs the graph on its own session and
        loads og's copy of the weights (`load_weights`) only for a graph it cannot batch."""
        import onnxruntime_genai as og
        self._og = og
        self.model_dir = Path(model_dir)
        self.context_length = genai_config.context_length(self.model_dir)
        for adapter in adapters:  # before the (slower) model load, and before any token
            check_fits(self.model_dir, adapter.path)
        try:
            self.tokenizer = og.Tokenizer(og.Config(str(self.model_dir)))
        except RuntimeError as exc:
            raise _cannot_load(exc, self.model_dir) from None
        self.eos_ids = {int(t) for t in self.tokenizer.eos_token_ids}
        # og's tokenizer adds no start token: every prompt gets the model's own (a BOS for
        # Gemma, nothing for tiny-phi3 or SmolLM2), read from the dir's tokenizer files
        self.sequence_start = sequence_start.of_model_dir(self.model_dir)
        self.model = self.adapters = None
        self._adapter_list = list(adapters)
        self.adapter_names = [a.name for a in adapters]
        self.adapter_files = {a.name: a.path for a in adapters}
        self.active: str | None = None
        self._kept: _KeptGenerator | None = None
        self.activate(active)
        if weights:
            self.load_weights()

    def load_weights(self) -> None:
        """og's model and the adapters on it (once): what generation through og needs."""
        if self.model is not None:
            return
        start = time.perf_counter()
        try:
            self.model = self._og.Model(_config(self._og, self.model_dir))
        except RuntimeError as exc:
            raise _cannot_load(exc, self.model_dir) from None
        adapters = self._og.Adapters(self.model) if self._adapter_list else None
        for adapter in self._adapter_list:
            try:
                adapters.load(str(adapter.path), adapter.name)
            except RuntimeError as exc:
                raise InputError(f"onnxruntime-genai cannot load the adapter "
                                 f"({first_line(exc)})", str(adapter.path),
                                 "use an adapter exported for this model") from None
        self.adapters = adapters
        ui.debug(f"loaded {self.model_dir} in {time.perf_counter() - start:.2f} s "
                 f"(adapters: {', '.join(self.adapter_names) or 'none'}; "
                 f"{hugepages.describe()})")

    def activate(self, name: str | None, where: str = "--adapter_name") -> None:
        """Switch adapter for the next answers; None or 'none' is the base model."""
        if name is None or name.lower() == "none":
            self.active = None
            return
        if name not in self.adapter_names:
            raise InputError(f"no adapter named '{name}' ({describe(self.adapter_names)})",
                             where, "pick a loaded name, or load it with "
                             "--adapter PATH=NAME")
        self.active = name

    # ------------------------------------------------------------ prompts to tokens

    def encode(self, text: str) -> list[int]:
        """The text's own ids (onnxruntime-genai's tokenizer adds nothing around them)."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def sequence(self, ids: Sequence[int]) -> list[int]:
        """Ids as a prompt the model sees: its start token(s) once, then `ids`."""
        return self.sequence_start.apply(ids)

    def prompt_ids(self, text: str) -> list[int]:
        """A whole prompt's ids: the model's start, then the text's (a chat template that
        writes the BOS itself gets no second one)."""
        return self.sequence(self.encode(text))

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's own chat template (from its tokenizer files), generation prompt added."""
        try:
            return self.tokenizer.apply_chat_template(json.dumps(messages),
                                                      add_generation_prompt=True)
        except RuntimeError as exc:
            raise OptionError(f"the model's chat template cannot be applied ({first_line(exc)})",
                              str(self.model_dir), r'pass --template "<|user|>\n{input}<|end|>'
                              r'\n<|assistant|>\n" (the model' "'s own prompt format)") from None

    # ------------------------------------------------------------ generation

    def check_length(self, ids: Sequence[int]) -> None:
        if len(ids) >= self.context_length:
            raise InputError(f"the prompt is {len(ids)} tokens; the model's context holds "
                             f"{self.context_length}", str(self.model_dir),
                             "shorten the prompt (in a chat, /reset starts over)")

    def start(self, ids: Sequence[int], sampling: Sampling, adapter: str | None) -> "Decoding":
        """A fresh answer to `ids` under `adapter` (None: the base model), its KV cache sized
        for this answer only; it does not touch the active adapter or the kept chat cache, so
        any number can run side by side."""
        self.check_length(ids)
        if adapter is not None and adapter not in self.adapter_names:
            raise InputError(f"no adapter named '{adapter}' ({describe(self.adapter_names)})")
        needed = min(len(ids) + sampling.max_new_tokens, self.context_length)
        generator = self._new_generator(needed, sampling.search_options(), adapter)
        return Decoding(self, generator, ids, sampling.max_new_tokens)

    def generate(self, ids: Sequence[int], sampling: Sampling,
                 on_text: Callable[[str], None] | None = None,
                 interruptible: bool = False, keep: bool = False) -> Answer:
        """Generate an answer to `ids`, passing each new piece of text to `on_text`.

        Stops at an end-of-sequence token (genai_config's eos_token_id), after
        `max_new_tokens`, or at the context length. With `interruptible`, Ctrl-C ends the
        answer early instead of propagating. With `keep`, the generator is kept for the
        next call, which then prefills only what its prompt adds to this one's tokens.
        """
        self.check_length(ids)
        start = time.perf_counter()
        search = sampling.search_options()
        needed = min(len(ids) + sampling.max_new_tokens, self.context_length)
        reused = self._reuse(ids, search, needed) if keep else None
        self._kept = None  # a fresh generator must not hold a second KV cache beside the old
        if reused is not None:
            generator, cached, capacity = reused
        else:
            cached, capacity = 0, _capacity(needed, self.context_length) if keep else needed
            generator = self._new_generator(capacity, search, self.active)
        decoding = Decoding(self, generator, ids, sampling.max_new_tokens, cached, start)
        interrupted = False
        try:
            decoding.prefill()
            if keep:
                self._kept = _KeptGenerator(generator, self.active, search, capacity)
            while not decoding.done:
                piece = decoding.step()
                if piece and on_text:
                    on_text(piece)
        except KeyboardInterrupt:
            if not interruptible:
                raise
            interrupted = True
        return decoding.answer(interrupted)

    def chat_ready(self, sampling: Sampling) -> bool:
        """Whether a kept KV cache can serve the next turn's adapter and search options."""
        return self._kept_for(sampling.search_options()) is not None

    def _kept_for(self, search: dict) -> _KeptGenerator | None:
        """The kept generator if it was made for the active adapter and these options."""
        kept = self._kept
        if kept is not None and kept.adapter == self.active and kept.search == search:
            return kept
        return None

    def prepare_chat(self, sampling: Sampling) -> None:
        """Allocate a chat's KV cache before its first turn, so the first answer does not
        wait for it: onnxruntime-genai fills the whole cache when it creates a generator,
        seconds for a Phi-3-mini-sized cache (BENCHMARKS.md, infer, has the figure)."""
        start = time.perf_counter()
        search, capacity = sampling.search_options(), min(CHAT_CACHE_TOKENS, self.context_length)
        self._kept = None  # the old cache is freed before the new one is allocated
        self._kept = _KeptGenerator(self._new_generator(capacity, search, self.active),
                                    self.active, search, capacity)
        ui.debug(f"KV cache for {capacity} tokens allocated in "
                 f"{time.perf_counter() - start:.2f} s")

    def _new_generator(self, max_length: int, search: dict, active: str | None):
        self.load_weights()
        params = self._og.GeneratorParams(self.model)
        # a sliding-window graph needs a cache of at least its window, however short the answer
        max_length = genai_config.kv_tokens(self.model_dir, max_length)
        params.set_search_options(max_length=max_length, **search)
        generator = self._og.Generator(self.model, params)
        if active is not None:
            generator.set_active_adapter(self.adapters, active)
        return generator

    def _reuse(self, ids: Sequence[int], search: dict, needed: int):
        """(generator, shared prefix length, capacity): the kept generator rewound to the
        longest prefix it shares with `ids`; None when it cannot serve this prompt."""
        kept = self._kept_for(search)
        if kept is None or needed > kept.capacity:
            return None
        sequence = [int(t) for t in kept.generator.get_sequence(0)]
        if not sequence:  # made by prepare_chat, nothing in it yet
            return kept.generator, 0, kept.capacity
        # The last token a generator produced is not in its KV cache yet, and
        # onnxruntime-genai 0.18 appends after it as if it were (logits off by 0.5 on
        # tiny-phi3): always rewind past it and feed it again. At least one prompt token
        # is fed, or there would be no logits to sample from.
        shared = min(_common_prefix(sequence, ids), len(sequence) - 1, len(ids) - 1)
        if shared <= 0:
            return None
        kept.generator.rewind_to(shared)
        return kept.generator, shared, kept.capacity


class Decoding:
    """One answer in progress on its own generator: the prompt fed (in chunks if asked), then
    a token per step(). Only the thread that drives it may touch it."""

    def __init__(self, session: Session, generator, ids: Sequence[int], max_new_tokens: int,
                 cached: int = 0, start: float | None = None):
        self.session = session
        self.generator = generator
        self.prompt = list(ids)
        self.max_new_tokens = max_new_tokens
        self.cached = cached  # prompt tokens already in the generator's KV cache
        self.fed = cached
        self.start = time.perf_counter() if start is None else start
        self.stream = session.tokenizer.create_stream()
        self.new: list[int] = []
        self.pieces: list[str] = []
        self.first: float | None = None

    @property
    def prefilled(self) -> bool:
        return self.fed >= len(self.prompt)

    def prefill(self, chunk: int | None = None) -> bool:
        """Feed the next `chunk` prompt tokens (all by default); True once all are in.
        Chunks let a scheduler interleave a long prompt with other answers' tokens."""
        end = len(self.prompt) if chunk is None else min(len(self.prompt), self.fed + chunk)
        if end > self.fed:
            self.generator.append_tokens(self.prompt[self.fed:end])
            self.fed = end
        return self.prefilled

    @property
    def eos(self) -> bool:
        return bool(self.new) and self.new[-1] in self.session.eos_ids

    @property
    def done(self) -> bool:
        return (self.eos or len(self.new) >= self.max_new_tokens
                or (self.prefilled and self.generator.is_done()))

    def step(self) -> str:
        """Generate one token; its text ('' for an end-of-sequence token, or while the token
        is an incomplete UTF-8 sequence)."""
        self.generator.generate_next_token()
        token = int(self.generator.get_next_tokens()[0])
        self.new.append(token)
        if self.first is None:
            self.first = time.perf_counter()
        if token in self.session.eos_ids:
            return ""  # is_done() now holds; the marker is not part of the text
        piece = self.stream.decode(token)
        if piece:
            self.pieces.append(piece)
        return piece

    @property
    def tokens(self) -> int:
        """Tokens in the answer, a closing end-of-sequence token not counted."""
        return len(self.new) - (1 if self.eos else 0)

    def answer(self, interrupted: bool = False) -> Answer:
        end = time.perf_counter()
        first = self.first or end
        new = self.new
        rate = (len(new) - 1) / (end - first) if len(new) > 1 and end > first else None
        return Answer("".join(self.pieces), list(new), self.tokens, first - self.start, rate,
                      interrupted, len(self.prompt), self.cached)


def _cannot_load(exc: Exception, model_dir: Path) -> InputError:
    return InputError(f"onnxruntime-genai cannot load the model ({first_line(exc)})",
                      str(model_dir), "re-export it with phitune auto-opt")


def _config(og, model_dir: Path):
    """The model's config with every core for the CPU session: onnxruntime-genai's default
    decoded on one of two cores here (`bench.py infer` measures the gain from both).
    A thread count the model dir already sets is kept."""
    import os
    config = og.Config(str(model_dir))
    if "intra_op_num_threads" not in genai_config.decoder(model_dir).get("session_options", {}):
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads or 1}}}}))
    return config
