"""`phitune infer`: chat with an onnxruntime-genai model dir, adapters switchable by name."""

from __future__ import annotations

from phitune import options


def _options() -> type:
    from phitune.infer.options import InferOptions
    return InferOptions


@options.command("infer", _options)
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

    run(options.from_kwargs(_options(), kwargs))
