"""`phitune quantize`: 4-bit AWQ (or RTN) into a Hugging Face AWQ checkpoint."""

from __future__ import annotations

from phitune import options, registry


@options.command("quantize", registry.step("quantize").options)
def quantize(**kwargs) -> None:
    """Quantize a model's linear weights to 4 bits (AutoAWQ GEMM layout).

    \b
    The output is a Hugging Face AWQ checkpoint that transformers and
    onnxruntime-genai's model builder read directly:
      phitune quantize -m microsoft/Phi-3.5-mini-instruct --algorithm awq -o models/phi/awq
      phitune quantize -m tiny-phi3 -o models/tiny/awq
    """
    registry.run_publishing("quantize", kwargs)


command = quantize  # the name phitune.cli.main looks up for a registered step
