"""`phitune infer`: chat with an onnxruntime-genai model dir, adapters switchable by name."""

from __future__ import annotations

import click

from phitune.infer.chat import InferOptions
from phitune.options import CONTEXT, click_options


@click.command(context_settings=CONTEXT)
@click_options(InferOptions)
def infer(**kwargs) -> None:
    """Chat with an onnxruntime-genai model; answers stream to stdout.

    \b
      phitune infer -m models/phi/onnx --prompt "Plan a day in Lisbon"
      phitune infer -m models/phi/onnx --adapter travel.onnx_adapter=travel \\
        --adapter tone.onnx_adapter=tone --adapter_name tone
      printf 'first prompt\\nsecond prompt\\n' | phitune --json infer -m models/phi/onnx
    In a chat: /adapter NAME (or none), /reset, /quit.
    """
    from phitune.infer.chat import run

    run(InferOptions(**kwargs))
