"""The steps a workflow can run, by name: where each one's options dataclass and run function
live, what kind of output it publishes, and which of its options never shape that output.

The CLI (`phitune.cli.main`), `phitune run --config` (`phitune.workflow`) and
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

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from phitune import options


# Options about this run, not about what it makes: no key counts them, neither a step's output
# key nor a workflow's entry key (the workflow owns `output` and `force` itself).
BOOKKEEPING = ("output", "force", "resume", "save_steps")


@dataclass(frozen=True)
class StepDef:
    name: str
    module: str                      # holds the options class and `run`
    options_class: str
    kind: str | None                 # the artifact kind it publishes (None: writes nothing)
    # The module of the options class: apart from the step's, so that `--help` and
    # `run --config`'s parse import nothing the step needs to run.
    options_module: str
    # What a step's own output key is made of (`key_params`): every option is a param except
    # BOOKKEEPING, `inputs` (models, files: the step keys them by content digest) and
    # `runs_only` (how the step runs, never what it writes). A workflow's entry key
    # (workflow/keys.py) counts every option but BOOKKEEPING: it keys inputs by @ref or
    # content itself, and keeps `runs_only` options as its keys always did (dropping them
    # now would make every cached entry stale).
    inputs: tuple[str, ...] = ()
    runs_only: tuple[str, ...] = ()
    # Bounds do not change what a step measures: its figures are cached without them and
    # checked against the bounds of every run.
    bounds: tuple[str, ...] = ()
    # Options added after outputs were keyed: at its default such an option makes the step do
    # what it did before the option existed, so it enters a key (the step's and a workflow
    # entry's) only when set otherwise, and outputs made before stay up to date.
    keyed_when_set: tuple[str, ...] = ()

    def key_params(self, opts: Any) -> dict:
        """The option values that enter the step's output key and its manifest's params."""
        return self.without_unset(options.params(opts, BOOKKEEPING + self.inputs + self.runs_only))

    def without_unset(self, params: dict) -> dict:
        """`params` less the `keyed_when_set` options that are at their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.options())}
        return {k: v for k, v in params.items()
                if not (k in self.keyed_when_set and v == defaults.get(k))}

    def options(self) -> type:
        return getattr(importlib.import_module(self.options_module), self.options_class)

    def runner(self) -> Callable[[Any], Any]:
        return importlib.import_module(self.module).run

    def make(self, values: dict) -> Any:
        """The options dataclass from click-named values (`eval_` → `eval`)."""
        return options.from_kwargs(self.options(), values)


STEPS: dict[str, StepDef] = {s.name: s for s in (
    # eval_data: what --eval reports perplexity on, not the weights; compiled kernels compute
    # what eager ones do
    StepDef("quantize", "phitune.quantize.step", "QuantizeOptions", "awq-model",
            "phitune.quantize.options",
            inputs=("model", "calib_data"), runs_only=("device", "compile", "eval_data")),
    StepDef("finetune", "phitune.finetune.step", "FinetuneOptions", "finetuned",
            "phitune.finetune.options",
            inputs=("model", "data_files", "data_name"), runs_only=("device", "extra"),
            keyed_when_set=("base_weights", "optim_state_dtype", "eval_steps", "report_to")),
    # use_ort_genai: accepted for the lab's command line, the output is the same
    StepDef("auto-opt", "phitune.export.step", "AutoOptOptions", "onnx-genai",
            "phitune.export.options",
            inputs=("model", "adapter_path"), runs_only=("use_ort_genai",)),
    StepDef("eval", "phitune.eval.step", "EvalOptions", None, "phitune.eval.options",
            bounds=("max_ppl", "max_latency_ms")),
)}


def step(name: str) -> StepDef:
    return STEPS[name]


def run_publishing(name: str, values: dict) -> None:
    """Run a step that writes an output, from click-named values, and report it the same way
    for every step: its summary table, and a note when the output was already up to date."""
    run_options(name, step(name).make(values))  # declared option ranges checked in make


def run_options(name: str, opts: Any) -> None:
    """`run_publishing` from the options dataclass itself (what `run --config` builds)."""
    from phitune import ui
    from phitune.artifacts.output import probe_writable
    probe_writable(opts.output)     # before the step resolves (a .gguf converts) or loads anything
    manifest, up_to_date = step(name).runner()(opts)
    if not manifest:  # a non-zero rank of a distributed run: rank 0 reports
        return
    if up_to_date:
        ui.info(f"{opts.output} is up to date (same inputs and options); --force redoes it")
    ui.summary(f"{name} → {opts.output}", manifest["metrics"] | {"up_to_date": up_to_date})
