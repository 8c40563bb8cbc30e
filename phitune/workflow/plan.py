"""Load a workflow file, check every step against its command's options, key it, plan.

Nothing here loads a model or imports torch: a bad file fails in well under a second, and
`--dry-run` shows the plan at the cost of reading the config and hashing the input files.

The path of a file: `files.read_config` (JSON/YAML, bounded) → an Olive config translated to
phitune steps (`olive`) → each step's mapping checked and its options parsed through the
option fields the CLI reads (`steps`, `step_options`) → keys (`keys`) → the output dirs checked
→ `make_plan`: which steps run, which are cached. Options that do not shape the output
(`resume`, `save_steps`) are left out of the keys. An existing entry is complete (outputs are
published atomically), so its step is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phitune.artifacts.embedded import EMBEDDED_MODELS
from phitune.artifacts.manifest import read_manifest
from phitune.errors import OptionError, OutputError
from phitune.workflow.files import read_config
from phitune.workflow.keys import key_steps
from phitune.workflow.steps import INPUT_PATHS, REF, Step, build_step, step_entries

DEFAULT_CACHE_DIR = ".phitune-cache"
TOP_LEVEL = ("output_dir", "cache_dir", "steps", "description")


@dataclass
class Workflow:
    source: Path
    format: str                     # "phitune" | "olive"
    output_dir: Path
    cache_dir: Path
    steps: list[Step]
    notes: list[str] = field(default_factory=list)   # Olive keys read but not applied

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


@dataclass
class Planned:
    step: Step
    action: str                     # "run" | "cached"
    reason: str


def load_workflow(path: str | Path, output_dir: str | None = None,
                  cache_dir: str | None = None) -> Workflow:
    """Read a phitune or Olive workflow file and check it completely; nothing runs."""
    path = Path(path)
    raw = read_config(path)
    notes: list[str] = []
    fmt = "phitune"
    if "steps" not in raw and ("input_model" in raw or "passes" in raw):
        from phitune.workflow.olive import translate
        raw, notes = translate(raw, path)
        fmt = "olive"
    elif "steps" not in raw:
        raise OptionError(f"{path} is not a workflow: no `steps` (phitune) and no "
                          "`input_model`/`passes` (Olive)", str(path),
                          "see examples/workflow.yaml or examples/olive-lora.json")
    return build(raw, path, fmt, notes, output_dir, cache_dir)


def build(raw: dict, source: Path, fmt: str = "phitune", notes: list[str] | None = None,
          output_dir: str | None = None, cache_dir: str | None = None) -> Workflow:
    where = str(source)
    for key in raw:
        if key not in TOP_LEVEL:
            raise OptionError(f"unknown top-level key '{key}'", where,
                              f"use {', '.join(TOP_LEVEL)}")
    out = output_dir or raw.get("output_dir")
    if not out:
        raise OptionError("no output_dir: where the final outputs are linked", where,
                          "add `output_dir: DIR` to the file or pass --output_dir")
    cache = Path(cache_dir or raw.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()
    entries = step_entries(raw.get("steps"), where)
    steps: list[Step] = []
    names = [name for name, _ in entries]
    for index, (name, spec) in enumerate(entries):
        steps.append(build_step(name, spec, names[:index], names, source))
    # The final outputs: what no later step builds on (an eval reading a model leaves it final).
    referenced = {d for s in steps if s.type != "eval" for d in s.deps}
    for s in steps:
        if s.publish is None:
            s.publish = s.name not in referenced
    wf = Workflow(source, fmt, Path(out).expanduser(), cache, steps, notes or [])
    compute_keys(wf)
    _check_output_dir(wf)
    return wf


def compute_keys(wf: Workflow) -> None:
    """Each step's entry key and path (`keys`)."""
    key_steps(wf.steps, wf.cache_dir)


# ---------------------------------------------------------------- outputs and the plan

def _step_reads(wf: Workflow) -> list[Path]:
    """The files and dirs the steps read that no step of the file makes (models, data,
    calibration, adapters): what output_dir and cache_dir must stay clear of."""
    reads = []
    for step in wf.steps:
        for option in (*INPUT_PATHS, "model", "data_name"):
            value = step.params.get(option)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if not isinstance(item, str) or REF.match(item) or item in EMBEDDED_MODELS:
                    continue
                for part in (p.strip() for p in item.split(",") if p.strip()):
                    if Path(part).expanduser().exists():
                        reads.append(Path(part).expanduser())
    return reads


def _check_output_dir(wf: Workflow) -> None:
    from phitune.artifacts.output import check_not_overlapping
    out = wf.output_dir
    reads = _step_reads(wf)
    # the guard every command's -o has, with links resolved: a loop through a symlink too
    check_not_overlapping(out, reads, "output_dir")
    check_not_overlapping(wf.cache_dir, reads, "cache_dir")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {out} is a file", str(wf.source), "choose a directory path")
    for step in wf.steps:
        link = out / step.name
        if step.publish and (link.exists() or link.is_symlink()) and not link.is_symlink():
            raise OutputError(f"{link} exists and is not a link phitune made", str(wf.source),
                              "move it away, or choose another output_dir")


def entry_complete(entry: Path | None) -> bool:
    from phitune.artifacts.manifest import changed_files
    manifest = read_manifest(entry) if entry is not None else None
    # a weights file truncated or removed since publishing makes the entry incomplete
    return bool(manifest and manifest.get("key")) and not changed_files(entry, manifest)


def make_plan(wf: Workflow, force: tuple[str, ...] = ()) -> list[Planned]:
    """Which steps run and why. A forced step re-runs with every step that reads it."""
    names = [s.name for s in wf.steps]
    for name in force:
        if name not in names:
            raise OptionError(f"--force {name}: no such step", str(wf.source),
                              f"steps: {', '.join(names)}")
    forced: set[str] = set()
    running: set[str] = set()
    plan = []
    for step in wf.steps:
        upstream_forced = [d for d in step.deps if d in forced]
        if step.name in force or upstream_forced:
            forced.add(step.name)
            reason = "forced" if step.name in force else f"forced: reads '{upstream_forced[0]}'"
            action = "run"
        elif entry_complete(step.entry):
            action, reason = "cached", ""
        else:
            action = "run"
            changed = [d for d in step.deps if d in running]
            reason = f"reads '{changed[0]}', which runs" if changed else "not in the cache"
        if action == "run":
            running.add(step.name)
        plan.append(Planned(step, action, reason))
    return plan
