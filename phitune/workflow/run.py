"""Execute a plan: run each step's command in-process into its cache entry, or skip it; then
link the published outputs into output_dir and record the run for `phitune cache`.

A step runs as `phitune <type> <options> -o <cache_dir>/<type>-<key>` would: its options
dataclass, built from the values the plan parsed through the CLI's option fields (refs
resolved to cache entries), goes to the step's `run` as the CLI's does. A failing
step stops the run with that step's own one-line error: the steps before it stay cached, and
output_dir is left as the last successful run made it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from phitune import hidden, registry, ui
from phitune.artifacts.manifest import read_manifest
from phitune.errors import OptionError, PhituneError
from phitune.workflow.plan import Planned, Workflow
from phitune.workflow.step_options import build
from phitune.workflow.steps import REF

RECORD = "phitune-workflow.json"      # in output_dir: which cache entries the last run used
REGISTRY = ".phitune-outputs.json"    # in cache_dir: the output dirs that use this cache


def say(line: str) -> None:
    """A plain line on stderr, never wrapped or styled (paths may hold brackets)."""
    ui.console.print(line, soft_wrap=True, markup=False, highlight=False)


def describe(wf: Workflow, plan: list[Planned], dry_run: bool) -> None:
    kind = "Olive config" if wf.format == "olive" else "workflow"
    say(f"{kind} {wf.source}: {len(plan)} step(s), cache {wf.cache_dir}, outputs {wf.output_dir}")
    for note in wf.notes:
        say(f"note: {note}")
    width = max(len(p.step.name) for p in plan)
    for p in plan:
        state = "cached" if p.action == "cached" else ("would run" if dry_run else "to run")
        why = f" ({p.reason})" if p.reason else ""
        say(f"  {p.step.name:<{width}}  {p.step.type:<8}  {state}{why}  → {p.step.entry}")
        if dry_run:
            say(f"      {p.step.command_line()}")


def execute(wf: Workflow, plan: list[Planned], dry_run: bool = False) -> dict:
    """Run the plan; returns a summary (also what --json prints)."""
    describe(wf, plan, dry_run)
    summary = {"config": str(wf.source), "format": wf.format, "cache_dir": str(wf.cache_dir),
               "output_dir": str(wf.output_dir), "dry_run": dry_run, "notes": wf.notes,
               "steps": []}
    if dry_run:
        todo = sum(p.action == "run" for p in plan)
        say(f"dry run: {todo} step(s) would run, {len(plan) - todo} cached; nothing was run")
        summary["steps"] = [{"name": p.step.name, "type": p.step.type, "key": p.step.key,
                             "entry": str(p.step.entry), "action": p.action, "reason": p.reason}
                            for p in plan]
        return summary
    from phitune.artifacts.output import probe_writable
    probe_writable(wf.cache_dir, "cache_dir")   # before any step loads a model
    probe_writable(wf.output_dir, "output_dir")
    total = time.perf_counter()
    for p in plan:
        step = p.step
        row = {"name": step.name, "type": step.type, "key": step.key, "entry": str(step.entry)}
        if p.action == "cached":
            say(f"{step.name}: cached — {step.entry} (same key {step.key[:16]}); not run")
            _touch(step.entry)
            if not step.has_output:  # cached figures, checked against this run's bounds
                _check_bounds(step, (read_manifest(step.entry) or {}).get("metrics", {}),
                              cached=True)
            summary["steps"].append(row | {"action": "cached", "seconds": 0.0})
            continue
        say(f"{step.name}: running phitune {step.type}{' (' + p.reason + ')' if p.reason else ''}")
        start = time.perf_counter()
        try:
            _run_step(wf, p)
        except BaseException:
            say(f"{step.name}: failed; earlier steps stay cached, {wf.output_dir} is unchanged")
            raise
        seconds = round(time.perf_counter() - start, 2)
        say(f"{step.name}: done in {seconds:.1f} s → {step.entry}")
        summary["steps"].append(row | {"action": "ran", "seconds": seconds})
    summary["outputs"] = publish(wf)
    record(wf)
    ran = sum(s["action"] == "ran" for s in summary["steps"])
    summary["seconds"] = round(time.perf_counter() - total, 2)
    say(f"workflow done: {ran} step(s) ran, {len(plan) - ran} cached, in "
        f"{summary['seconds']:.1f} s; outputs in {wf.output_dir}")
    return summary


def resolve_refs(wf: Workflow, value: Any) -> Any:
    """`@name/sub` → the cache entry of step `name` (/sub), in a value or the items of one."""
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_refs(wf, v) for v in value)
    ref = REF.match(value) if isinstance(value, str) else None
    if ref is None:
        return value
    entry = wf.step(ref.group(1)).entry
    return str(entry / ref.group(2)) if ref.group(2) else str(entry)


def step_options(wf: Workflow, step, bounds: bool = True) -> Any:
    """The step's options dataclass: its parsed values, refs resolved, writing its entry (the
    step's own --force swaps a forced one in); eval's bounds left out unless `bounds`."""
    values = {k: resolve_refs(wf, v) for k, v in step.values.items()}
    if not bounds:
        values |= {k: None for k in step.bounds}
    if not step.has_output:
        return build(step.type, values)
    return build(step.type, values, str(step.entry), force=step.entry.exists())


def _run_step(wf: Workflow, p: Planned) -> None:
    step = p.step
    wf.cache_dir.mkdir(parents=True, exist_ok=True)
    with _step_output():
        if step.has_output:
            registry.run_options(step.type, step_options(wf, step))
        else:
            _run_measure(step, step_options(wf, step, bounds=False))


def _run_measure(step, opts: Any) -> None:
    """A step that writes nothing (eval): its figures become the entry's manifest, so an
    unchanged model is not measured twice. They are measured without the bounds, stored,
    then checked: a missed bound fails this run (ConstraintError, exit 3) and every later run
    with the same bound, without measuring again; a relaxed bound passes on the same figures."""
    from phitune.artifacts.output import Output
    metrics = registry.step(step.type).runner()(opts)
    ui.summary(f"eval {opts.model}", metrics)
    out = Output(step.entry, "eval-result", step.type, {"workflow_key": step.key},
                 dict(step.params))
    with out.staging() as work:
        out.publish(work, metrics)
    _check_bounds(step, metrics)


def _check_bounds(step, metrics: dict, cached: bool = False) -> None:
    from phitune.eval.options import EvalOptions
    from phitune.eval.step import check_constraints
    if not any(v is not None for v in step.bounds.values()):
        return
    figures = {"max_ppl": "ppl", "max_latency_ms": "latency_ms"}
    for bound, value in step.bounds.items():
        if value is not None and figures.get(bound) not in metrics:
            raise OptionError(f"step '{step.name}': {bound} needs the {figures.get(bound)} "
                              "figure, which this eval does not measure", "phitune run",
                              "drop the bound, or `latency: false` for max_latency_ms")
    opts = EvalOptions(model=str(step.entry), **step.bounds)
    try:
        check_constraints(opts, dict(metrics))
    except PhituneError as exc:
        exc.where = f"step '{step.name}'" + (" (cached figures)" if cached else "")
        raise
    say(f"{step.name}: constraints met ("
        + ", ".join(f"{k} {v:g}" for k, v in step.bounds.items() if v is not None) + ")")


@contextmanager
def _step_output() -> Iterator[None]:
    """Each step prints its summary table; with --json only the workflow's summary goes to
    stdout, so the steps' own JSON is held back."""
    saved = ui._state["json"]
    ui._state["json"] = False
    try:
        yield
    finally:
        ui._state["json"] = saved


def _touch(entry: Path) -> None:
    """Mark an entry as used now (`phitune cache clean --older-than` reads this)."""
    try:
        os.utime(entry)
    except OSError:
        pass


# ---------------------------------------------------------------- outputs

def publish(wf: Workflow) -> dict[str, str]:
    """output_dir/<step> → its cache entry, as relative symlinks swapped in atomically."""
    out = wf.output_dir
    out.mkdir(parents=True, exist_ok=True)
    links = {}
    try:  # links the last run made for steps this workflow no longer publishes
        before = json.loads((out / RECORD).read_text()).get("steps", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        before = {}
    now = {s.name for s in wf.steps if s.publish}
    for name, old in before.items():
        link = out / name
        if isinstance(old, dict) and old.get("published") and name not in now \
                and link.is_symlink():
            link.unlink()
    for step in wf.steps:
        if not step.publish:
            continue
        link = out / step.name
        target = os.path.relpath(step.entry.resolve(), out.resolve())
        if link.is_symlink() and os.readlink(link) == target:
            links[step.name] = str(link)
            continue
        tmp = hidden.link_staging(link)
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp, target_is_directory=True)
        os.replace(tmp, link)
        links[step.name] = str(link)
    return links


def record(wf: Workflow) -> None:
    """output_dir/phitune-workflow.json names every cache entry the run used (rewritten only
    when that changes), and the cache's registry lists the output dir."""
    rec = {"config": str(wf.source.resolve()), "cache_dir": str(wf.cache_dir.resolve()),
           "steps": {s.name: {"type": s.type, "key": s.key, "entry": s.entry.name,
                              "published": bool(s.publish)}
                     for s in wf.steps}}
    _write_if_changed(wf.output_dir / RECORD, rec)
    registry = wf.cache_dir / REGISTRY
    outputs = read_registry(wf.cache_dir)
    mine = str(wf.output_dir.resolve())
    if mine not in outputs:
        _write_if_changed(registry, sorted(outputs + [mine]))


def read_registry(cache_dir: Path) -> list[str]:
    try:
        data = json.loads((Path(cache_dir) / REGISTRY).read_text())
        return [str(d) for d in data] if isinstance(data, list) else []
    except (OSError, json.JSONDecodeError):
        return []


def _write_if_changed(path: Path, data) -> None:
    text = json.dumps(data, indent=2) + "\n"
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
