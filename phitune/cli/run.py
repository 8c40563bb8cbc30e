"""`phitune run --config`: a phitune workflow or an Olive config, each step cached by key."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", required=True, metavar="FILE",
              help="A phitune workflow (.yaml/.json with `steps:`) or an Olive config "
                   "(`input_model`, `data_configs`, `passes`, `engine`).")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True,
              help="Print the plan (which steps run, which are cached) and run nothing.")
@click.option("--force", "force", multiple=True, metavar="STEP",
              help="Re-run STEP and every step that reads it, even if cached (repeatable).")
@click.option("--output_dir", "--output-dir", "output_dir", metavar="DIR",
              help="Override the file's output_dir (engine.output_dir for Olive).")
@click.option("--cache_dir", "--cache-dir", "cache_dir", metavar="DIR",
              help="Override the file's cache_dir (default .phitune-cache).")
def run(config: str, dry_run: bool, force: tuple[str, ...], output_dir: str | None,
        cache_dir: str | None) -> None:
    """Run the steps of a workflow file; a step whose key is cached is skipped.

    \b
    Each step is a command (quantize, finetune, auto-opt, eval) with the CLI's option names;
    a step reads an earlier one's output as "@name" ("@finetune/merged" for a subdirectory):
      steps:
        - {name: quantize, model: tiny-phi3}
        - {name: finetune, model: "@quantize", data_files: data/travel.jsonl, ...}
        - {name: onnx, type: auto-opt, model: "@finetune"}
        - {name: check, type: eval, model: "@onnx", max_ppl: 400}
    \b
    Every step's output is <cache_dir>/<type>-<key>; the key covers the step's options, the
    keys of the steps it reads and the content of its input files, so editing one step re-runs
    it and the steps after it, nothing before. The final outputs (steps no other step reads,
    or `publish: true`) are linked as <output_dir>/<name>. An eval step's figures are cached
    the same way and its bounds checked on every run (a missed bound: exit 3).
      phitune run --config examples/workflow.yaml --dry-run
      phitune run --config examples/olive-lora.json
    """
    from phitune import ui
    from phitune.workflow.plan import load_workflow, make_plan
    from phitune.workflow.run import execute

    wf = load_workflow(config, output_dir=output_dir, cache_dir=cache_dir)
    summary = execute(wf, make_plan(wf, force), dry_run=dry_run)
    if ui.json_mode():
        import json
        ui.emit(json.dumps(summary, indent=2, default=str) + "\n")
