"""`phitune export-adapter`: one more PEFT adapter for an existing ONNX base, no rebuild."""

from __future__ import annotations

import click


@click.command("export-adapter", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-a", "--adapter", "adapter", required=True, metavar="DIR",
              help="PEFT LoRA adapter dir (e.g. a finetune output's adapter/).")
@click.option("--base", "base", required=True, metavar="DIR",
              help="The auto-opt output (D or D/model) the adapter will run on.")
@click.option("-o", "--output", "output", required=True, metavar="FILE",
              help="The .onnx_adapter file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def export_adapter(adapter: str, base: str, output: str, force: bool) -> None:
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

    metrics = run(adapter, base, output, force)
    ui.summary(f"export-adapter → {output}", metrics)
