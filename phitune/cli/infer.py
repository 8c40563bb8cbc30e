"""`phitune infer`: chat with an onnxruntime-genai model dir, adapters switchable by name."""

from __future__ import annotations

import click

from phitune.cli.options import dual_option as _opt
from phitune.cli.options import model_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option("onnxruntime-genai model: a phitune auto-opt output D, D/model, or any dir with "
              "genai_config.json.")
@click.option("--prompt", metavar="TEXT",
              help="Answer this one prompt on stdout and exit. Without it: a chat on a terminal, "
                   "else one prompt per stdin line (blank lines skipped), one answer each.")
@click.option("--template", metavar="TEMPLATE",
              help=r"Prompt format with {input} and \n escapes, e.g. "
                   r"'<|user|>\n{input}<|end|>\n<|assistant|>\n' (default: the model's chat "
                   "template).")
@click.option("--adapter", multiple=True, metavar="PATH[=NAME]",
              help="A .onnx_adapter file to load (repeatable; NAME defaults to the file stem). "
                   "Default: the model dir's adapter_weights.onnx_adapter when present.")
@_opt("adapter_name", metavar="NAME", help="The adapter active at start (default: the first).")
@click.option("--no-adapter", "--no_adapter", "no_adapter", is_flag=True,
              help="Start on the base model (adapters given with --adapter stay loaded).")
@_opt("max_new_tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0),
              help="Sample at this temperature (default: greedy).")
@_opt("top_p", type=click.FloatRange(min=0.0, max=1.0, min_open=True),
      help="Sample from the smallest set of tokens with this total probability.")
@_opt("top_k", type=click.IntRange(min=1), help="Sample from the k most likely tokens.")
@click.option("--seed", type=int, help="Random seed for sampling (repeatable answers).")
@click.option("--stats", is_flag=True,
              help="Print time to first token and decode tokens/s on stderr.")
def infer(**kwargs) -> None:
    """Chat with an onnxruntime-genai model; answers stream to stdout.

    \b
      phitune infer -m models/phi/onnx --prompt "Plan a day in Lisbon"
      phitune infer -m models/phi/onnx --adapter travel.onnx_adapter=travel \\
        --adapter tone.onnx_adapter=tone --adapter_name tone
      printf 'first prompt\\nsecond prompt\\n' | phitune --json infer -m models/phi/onnx
    In a chat: /adapter NAME (or none), /reset, /quit.
    """
    from phitune.infer.chat import InferOptions, run

    run(InferOptions(**kwargs))
