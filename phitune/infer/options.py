"""`phitune infer`'s options, declared once (see phitune/options.py).

Apart from the session and the chat loop so that `phitune infer --help` imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from phitune import options as O
from phitune.errors import OptionError

MODEL_HELP = ("onnxruntime-genai model: a phitune auto-opt output D, D/model, or any dir with "
              "genai_config.json.")


@dataclass
class Sampling:
    """Search options; greedy unless a temperature > 0, --top_p or --top_k asks for sampling."""

    max_new_tokens: int = O.option(256, min=1, ranged=True)
    temperature: float | None = O.option(None, "Sample at this temperature (default: greedy).",
                                         type=float, min=0.0, ranged=True)
    top_p: float | None = O.option(None, "Sample from the smallest set of tokens with this total "
                                   "probability.", type=float, above=0.0, max=1.0, ranged=True)
    top_k: int | None = O.option(None, "Sample from the k most likely tokens.", type=int, min=1,
                                 ranged=True)
    seed: int | None = O.option(None, "Random seed for sampling (repeatable answers).", type=int,
                                dashed=False, min=0, max=2**32 - 1)

    @property
    def sample(self) -> bool:
        return (self.temperature or 0) > 0 or self.top_p is not None or self.top_k is not None

    def validate(self) -> None:
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise OptionError("--temperature 0 means greedy decoding, which ignores --top_p and "
                              "--top_k", "phitune infer",
                              "drop --temperature 0 to sample, or drop --top_p/--top_k")

    def search_options(self) -> dict:
        if not self.sample:
            return {"do_sample": False}
        options = {"do_sample": True, "temperature": self.temperature or 1.0}
        if self.top_p is not None:
            options["top_p"] = self.top_p
        if self.top_k is not None:
            options["top_k"] = self.top_k
        if self.seed is not None:
            options["random_seed"] = self.seed
        return options


@dataclass(kw_only=True)
class InferOptions(Sampling):
    """`phitune infer`'s options: the sampling ones are Sampling's own fields."""

    ORDER: ClassVar[tuple] = ("model", "prompt", "template", "adapter", "adapter_name",
                              "no_adapter", "max_new_tokens", "temperature", "top_p", "top_k",
                              "seed", "stats")

    model: str = O.model(MODEL_HELP)
    prompt: str | None = O.option(
        None, "Answer this one prompt on stdout and exit. Without it: a chat on a terminal, else "
        "one prompt per stdin line (blank lines skipped), one answer each.", metavar="TEXT",
        type=str)
    template: str | None = O.option(
        None, r"Prompt format with {input} and \n escapes, e.g. "
        r"'<|user|>\n{input}<|end|>\n<|assistant|>\n' (default: the model's chat template).",
        metavar="TEMPLATE", type=str)
    adapter: tuple[str, ...] = O.option(
        (), "A .onnx_adapter file to load (repeatable; NAME defaults to the file stem). Default: "
        "the model dir's adapter_weights.onnx_adapter when present.", multiple=True,
        metavar="PATH[=NAME]")
    adapter_name: str | None = O.option(None, "The adapter active at start (default: the "
                                        "first).", metavar="NAME", type=str)
    no_adapter: bool = O.option(False, "Start on the base model (adapters given with --adapter "
                                "stay loaded).", flag=True,
                                spellings=("--no-adapter", "--no_adapter"))
    stats: bool = O.option(False, "Print time to first token and decode tokens/s on stderr.",
                           flag=True)
