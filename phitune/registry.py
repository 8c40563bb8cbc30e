"""The steps a workflow can run, by name: where each one's options dataclass and run function
live, what kind of output it publishes, and which of its options never shape that output.

The CLI (`phitune.cli.main`), `phitune run --config` (`phitune.workflow.plan`) and
`phitune cache` read this table; adding a step means one module with an options dataclass
(declared with `phitune.options`) and a `run(opts)`, one entry here, and one click module.
Step modules load lazily so that `phitune --help` stays light.

Not every command is a step. A step publishes an artifact dir (files plus a `phitune.json`
manifest holding its key) or, like eval, only measures; `run --config` gives each step a
cache entry `<type>-<key>` and skips it when that entry is up to date. `infer` and `serve`
write nothing. `export-adapter` writes one file (`-o NAME.onnx_adapter`, usually beside
the base's graph, replaced only with --force) with no manifest and no key: a workflow could
neither cache it nor tell it up to date, so it is not listed here. Those commands still
declare their options once, as a dataclass (phitune.options), and `cli/main.COMMANDS` lists
them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import click

from phitune import options


@dataclass(frozen=True)
class StepDef:
    name: str
    module: str                      # holds the options class and `run`
    options_class: str
    kind: str | None                 # the artifact kind it publishes (None: writes nothing)
    # Options that never shape the output; the workflow owns `output` and `force`.
    not_in_key: tuple[str, ...] = ("output", "force", "resume", "save_steps")
    # Bounds do not change what a step measures: its figures are cached without them and
    # checked against the bounds of every run.
    bounds: tuple[str, ...] = ()

    def options(self) -> type:
        return getattr(importlib.import_module(self.module), self.options_class)

    def runner(self) -> Callable[[Any], Any]:
        return importlib.import_module(self.module).run

    def command(self) -> click.Command:
        """A parse-only click command built from the options dataclass."""
        return options.command_for(self.name, self.options())

    def make(self, values: dict) -> Any:
        """The options dataclass from click-named values (`eval_` → `eval`)."""
        return options.from_kwargs(self.options(), values)


STEPS: dict[str, StepDef] = {s.name: s for s in (
    StepDef("quantize", "phitune.quantize.step", "QuantizeOptions", "awq-model"),
    StepDef("finetune", "phitune.finetune.step", "FinetuneOptions", "finetuned"),
    StepDef("auto-opt", "phitune.export.step", "AutoOptOptions", "onnx-genai"),
    StepDef("eval", "phitune.eval_step", "EvalOptions", None,
            bounds=("max_ppl", "max_latency_ms")),
)}


def step(name: str) -> StepDef:
    return STEPS[name]


def run_publishing(name: str, values: dict) -> None:
    """Run a step that writes an output, from click-named values, and report it the same way
    for every step: its summary table, and a note when the output was already up to date."""
    from phitune import ui
    from phitune.artifacts import probe_writable
    opts = step(name).make(values)  # declared option ranges checked here
    probe_writable(opts.output)     # before the step resolves (a .gguf converts) or loads anything
    manifest, up_to_date = step(name).runner()(opts)
    if not manifest:  # a non-zero rank of a distributed run: rank 0 reports
        return
    if up_to_date:
        ui.info(f"{opts.output} is up to date (same inputs and options); --force redoes it")
    ui.summary(f"{name} → {opts.output}", manifest["metrics"] | {"up_to_date": up_to_date})
