"""`phitune export-adapter`: one more PEFT adapter for an existing ONNX base, no rebuild."""

from __future__ import annotations

from phitune import options


def _options() -> type:
    from phitune.export.options import ExportAdapterOptions
    return ExportAdapterOptions


@options.command("export-adapter", _options)
def export_adapter(**kwargs) -> None:
    """Convert a PEFT LoRA adapter into an .onnx_adapter for an auto-opt model.

    \b
      phitune export-adapter -a models/phi/ft2/adapter --base models/phi/onnx-ao/model \\
          -o models/phi/onnx-ao/model/tone.onnx_adapter
      phitune infer -m models/phi/onnx-ao --adapter models/phi/onnx-ao/model/tone.onnx_adapter
    \b
    Modules and shapes are checked against the base graph before anything is written.
    """
    from phitune import ui
    from phitune.export.export_adapter import run

    opts = options.from_kwargs(_options(), kwargs)
    ui.summary(f"export-adapter → {opts.output}", run(opts))
