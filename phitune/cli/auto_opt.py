"""`phitune auto-opt`: ONNX for onnxruntime-genai, int4 by default, adapters served apart."""

from __future__ import annotations

from phitune import options, registry


@options.command("auto-opt", registry.step("auto-opt").options)
def auto_opt(**kwargs) -> None:
    """Export to an onnxruntime-genai model: fused graph, int4 weights, LoRA inputs.

    \b
      phitune auto-opt -m models/phi/ft/model --adapter_path models/phi/ft/adapter \\
          --device cpu --provider CPUExecutionProvider --use_ort_genai -o models/phi/onnx-ao
    \b
    Writes D/model/ (genai_config.json, model.onnx + .data, tokenizer, chat template and
    adapter_weights.onnx_adapter when an adapter was given). Convert more adapters for the
    same base later with `phitune export-adapter`.
    """
    registry.run_publishing("auto-opt", kwargs)


command = auto_opt  # the name phitune.cli.main looks up for a registered step
