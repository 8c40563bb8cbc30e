"""Load a workflow file, check every step against its command's options, compute keys, plan.

Nothing here loads a model or imports torch: a bad file fails in well under a second, and
`--dry-run` shows the plan at the cost of reading the config and hashing the input files.

Keys: a step's key is sha256 over its type, its options as the command parses them (defaults
filled in, so spelling an option at its default changes nothing), the keys of the steps it
reads (`@name`), and content digests of the local files and directories it reads (so moving
a data file keeps the cache; editing it re-runs the step), and `sequence_start.RULE` (what
starts every sequence a step feeds its model). Options that do not shape the
output (`resume`, `save_steps`) are left out. A step's output is `<cache_dir>/<type>-<key16>`;
an existing one is complete (outputs are published atomically), so the step is skipped.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from phitune.artifacts import (EMBEDDED_MODELS, EMBEDDED_NAMES, content_digest,
                               embedded_path, make_key, read_manifest)
from phitune import inputfiles, registry
from phitune.sequence_start import RULE
from phitune.errors import InputError, OptionError, OutputError

DEFAULT_CACHE_DIR = ".phitune-cache"
RESERVED = ("name", "type", "publish")
TOP_LEVEL = ("output_dir", "cache_dir", "steps", "description")
WORKFLOW_OWNED = {"output": "the workflow writes each step to <cache_dir>/<type>-<key> and links "
                            "the final ones into output_dir",
                  "force": "pass --force STEP to phitune run"}
# Options naming input files that must exist (or be an @ref) before anything runs.
INPUT_PATHS = ("data_files", "calib_data", "eval_data", "adapter_path", "adapter", "text_file")
REF = re.compile(r"^@([A-Za-z0-9_][\w.-]*)(?:/(.*))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$")


@dataclass
class Step:
    """One step: its command line (refs unresolved), the parsed options, its key and output."""

    name: str
    type: str
    args: list[str]                 # CLI arguments without -o; refs still "@name[/sub]"
    params: dict                    # click-parsed values that shape the output (the key's)
    deps: list[str]                 # names of the steps whose outputs it reads
    publish: bool
    has_output: bool = True         # the command writes -o itself (eval: the workflow
                                    # stores its figures as the entry's manifest)
    key: str = ""
    entry: Path | None = None
    bounds: dict = field(default_factory=dict)   # eval: max_ppl / max_latency_ms as parsed

    def command_line(self) -> str:
        shown = [a.replace("\n", "\\n").replace("\t", "\\t") for a in self.args]
        return shlex.join(["phitune", self.type, *shown])


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


# ---------------------------------------------------------------- reading the file

def read_config(path: str | Path) -> dict:
    """A JSON or YAML file as a dict, with the line of a syntax error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such workflow file: {path}", "--config",
                         "pass a phitune workflow (.yaml/.json) or an Olive config (.json)")
    try:
        raw = _parse(inputfiles.read_text(path, "--config", limit=inputfiles.CONFIG_LIMIT), path)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start})", str(path),
                         "save the file as UTF-8") from None
    except RecursionError:  # json and yaml parse nested lists by recursion
        raise InputError(f"{path} nests lists or mappings too deeply to read", str(path),
                         "a workflow nests a few levels: check that this is the file you "
                         "meant") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} holds a {type(raw).__name__}, not a workflow mapping", str(path),
                         "write `steps:` (phitune) or `input_model:`/`passes:` (Olive) at the top")
    return raw


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column "
                             f"{exc.colno})", str(path), "fix the syntax") from None
    else:
        import yaml
        try:
            raw = _bounded_yaml(text, path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise InputError(f"{path} is not valid YAML ({getattr(exc, 'problem', exc)}{where})",
                             str(path), "fix the syntax") from None
    return raw


# A workflow has tens of nodes; expanded through its aliases, a "billion laughs" file has 10⁹.
YAML_NODES = 100_000


def _bounded_yaml(text: str, path: Path) -> Any:
    """YAML with its aliases counted before anything is built: the document expanded (each
    alias counted as a copy of what it names) may hold YAML_NODES nodes; a cycle is refused."""
    import yaml
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, {}, set(), path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_nodes(node: Any, sizes: dict, open_: set, path: Path) -> int:
    import yaml
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise InputError(f"{path} has an alias that contains itself", str(path),
                         "write the value out instead of the recursive alias")
    total = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        open_.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair]
        for child in children:
            total += _count_nodes(child, sizes, open_, path)
            if total > YAML_NODES:
                raise InputError(f"{path} expands to more than {YAML_NODES:,} YAML nodes "
                                 "through its aliases (anchors and *references)", str(path),
                                 "write a workflow without nested aliases")
        open_.discard(id(node))
    sizes[id(node)] = total
    return total


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


# ---------------------------------------------------------------- validating the steps

def step_types() -> tuple[str, ...]:
    return tuple(registry.STEPS)


def command(step_type: str) -> click.Command:
    """The parse-only command of a step, built from its options dataclass."""
    return registry.step(step_type).command()


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
    entries = _step_entries(raw.get("steps"), where)
    types = step_types()
    steps: list[Step] = []
    names = [name for name, _ in entries]
    for index, (name, spec) in enumerate(entries):
        steps.append(_build_step(name, spec, names[:index], names, types, source))
    # The final outputs: what no later step builds on (an eval reading a model leaves it final).
    referenced = {d for s in steps if s.type != "eval" for d in s.deps}
    for s in steps:
        if s.publish is None:
            s.publish = s.name not in referenced
    wf = Workflow(source, fmt, Path(out).expanduser(), cache, steps, notes or [])
    compute_keys(wf)
    _check_output_dir(wf)
    return wf


def _step_entries(steps: Any, where: str) -> list[tuple[str, dict]]:
    """`steps:` as a list of mappings with `name`, or a mapping name → options."""
    if isinstance(steps, dict):
        items = [(name, spec) for name, spec in steps.items()]
    elif isinstance(steps, list):
        items = []
        for i, spec in enumerate(steps):
            if not isinstance(spec, dict):
                raise OptionError(f"steps[{i}] is a {type(spec).__name__}, not a mapping", where,
                                  "write each step as `- name: ...` with its options")
            name = spec.get("name") or spec.get("type")
            if not name:
                raise OptionError(f"steps[{i}] has no name and no type", where,
                                  "add `name: quantize` (the type defaults to the name)")
            items.append((str(name), spec))
    else:
        raise OptionError("`steps` must be a list of steps", where,
                          "write `steps:` followed by `- name: quantize` entries")
    if not items:
        raise OptionError("the workflow has no steps", where, "add at least one step")
    seen = set()
    for name, spec in items:
        if not isinstance(spec, dict):
            raise OptionError(f"step '{name}' is a {type(spec).__name__}, not a mapping", where,
                              "give each step its options as a mapping")
        if not _NAME.match(name):
            raise OptionError(f"step name '{name}' has characters other than letters, digits, "
                              "'_', '.', '-'", where, "rename the step")
        if name in seen:
            raise OptionError(f"two steps are named '{name}'", where, "give each step its own name")
        seen.add(name)
    return items


def _build_step(name: str, spec: dict, earlier: list[str], all_names: list[str],
                types: tuple[str, ...], source: Path) -> Step:
    where = f"{source}, step '{name}'"
    step_type = str(spec.get("type") or name)
    if step_type not in types:
        raise OptionError(f"step '{name}': unknown step type '{step_type}'", str(source),
                          f"use one of {', '.join(types)} as `type:` (or as the step name)")
    publish = spec.get("publish")
    if publish is not None and not isinstance(publish, bool):
        raise OptionError(f"step '{name}': publish must be true or false", where, "fix the value")
    cmd = command(step_type)
    by_name = _options_by_name(cmd)
    args: list[str] = []
    deps: list[str] = []
    for key, value in spec.items():
        if key in RESERVED:
            continue
        norm = str(key).lstrip("-")
        opt = by_name.get(norm) or by_name.get(norm.replace("-", "_"))
        if opt is not None and opt.name in WORKFLOW_OWNED:
            raise OptionError(f"step '{name}': option '{key}' is set by the workflow", where,
                              WORKFLOW_OWNED[opt.name])
        if opt is None and norm in ("json", "verbose", "v"):  # the group's, for the whole run
            raise OptionError(f"step '{name}': '{key}' is a global option, not a step's", where,
                              f"pass it to the run: phitune run --config {source} "
                              f"--{'verbose' if norm == 'v' else norm}")
        if opt is None:
            raise OptionError(f"step '{name}' ({step_type}): unknown option '{key}'", where,
                              f"see 'phitune {step_type} --help' for its options")
        value = _locate_paths(value, opt.name, source)
        for ref in _refs(value):
            deps.append(_check_ref(ref, name, key, earlier, all_names, where))
        _check_inputs(value, opt.name, name, key, where)
        args += _to_args(opt, value, name, key, where)
    has_output = any(p.name == "output" for p in cmd.params)
    parse = args + (["-o", "<cache>"] if has_output else [])
    try:
        ctx = cmd.make_context(step_type, parse, resilient_parsing=False)
    except click.ClickException as exc:
        raise OptionError(f"step '{name}' ({step_type}): {exc.format_message()}", str(source),
                          f"see 'phitune {step_type} --help'") from None
    spec = registry.step(step_type)
    try:  # the declared ranges, as on the command line, before any step of the file runs
        spec.make(ctx.params)
    except OptionError as exc:
        raise OptionError(f"step '{name}' ({step_type}): {exc.what}", str(source),
                          exc.fix) from None
    bounds = {k: ctx.params.get(k) for k in spec.bounds}
    params = spec.without_unset({k: v for k, v in ctx.params.items()
                                 if k not in registry.BOOKKEEPING and k not in bounds})
    return Step(name, step_type, args, params, list(dict.fromkeys(deps)), publish, has_output,
                bounds=bounds)


def _options_by_name(cmd: click.Command) -> dict[str, click.Option]:
    """Every spelling of every option: --group_size, --group-size, group_size (its dest)."""
    names: dict[str, click.Option] = {}
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.name in ("help",):
            continue
        for spelling in param.opts:
            bare = spelling.lstrip("-")
            names.setdefault(bare, param)
            names.setdefault(bare.replace("-", "_"), param)
        names.setdefault(param.name, param)
        names.setdefault(param.name.rstrip("_"), param)  # eval_ ← eval
    return names


def _to_args(opt: click.Option, value: Any, step: str, key: str, where: str) -> list[str]:
    flag = next((o for o in opt.opts if o.startswith("--")), opt.opts[0])
    if value is None:
        return []
    if opt.is_flag:
        if not isinstance(value, bool):
            raise OptionError(f"step '{step}': {key} takes true or false, not {value!r}", where,
                              f"write {key}: true")
        if value:
            return [flag]
        return [opt.secondary_opts[0]] if opt.secondary_opts else []
    if isinstance(value, dict):
        raise OptionError(f"step '{step}': {key} takes a value, not a mapping", where,
                          "fix the value")
    if opt.multiple:
        items = value if isinstance(value, list) else [value]
        return [a for item in items for a in (flag, _text(item))]
    if isinstance(value, list):  # --text_cols a,b / --target_modules q,k as a YAML list
        if opt.type is not click.STRING or not all(isinstance(v, str) for v in value):
            raise OptionError(f"step '{step}': {key} takes one value, not a list", where,
                              "write a single value")
        return [flag, ",".join(value)]
    return [flag, _text(value)]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _refs(value: Any) -> list[re.Match]:
    items = value if isinstance(value, list) else [value]
    return [m for v in items if isinstance(v, str) for m in [REF.match(v)] if m]


def _check_ref(ref: re.Match, step: str, key: str, earlier: list[str], all_names: list[str],
               where: str) -> str:
    target = ref.group(1)
    if target in earlier:
        return target
    if target == step:
        raise OptionError(f"step '{step}': {key} '{ref.group(0)}' refers to the step itself",
                          where, "refer to an earlier step")
    if target in all_names:
        raise OptionError(f"step '{step}': {key} '{ref.group(0)}' refers to a later step", where,
                          "steps run in file order: move the step it reads before it")
    known = ", ".join(earlier) or "none"
    raise OptionError(f"step '{step}': {key} '{ref.group(0)}' names no step (earlier steps: "
                      f"{known})", where, "write @<name of an earlier step>")


def _locate_paths(value: Any, option: str, source: Path) -> Any:
    """A relative path that is missing here but exists beside the config file means that one."""
    if isinstance(value, list):
        return [_locate_paths(v, option, source) for v in value]
    if not isinstance(value, str) or not value or REF.match(value) or value in EMBEDDED_MODELS:
        return value
    if option not in INPUT_PATHS + ("model", "data_name"):
        return value
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return value
    beside = source.resolve().parent / path
    return str(beside) if beside.exists() else value


def _check_inputs(value: Any, option: str, step: str, key: str, where: str) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or REF.match(item):
            continue
        if option in INPUT_PATHS:
            for part in (p.strip() for p in item.split(",") if p.strip()):
                if not Path(part).expanduser().exists():
                    raise InputError(f"step '{step}': {key} {part} does not exist", where,
                                     "check the path (relative paths are read from the current "
                                     "directory, or beside the workflow file)")
        elif option == "model" and item not in EMBEDDED_MODELS \
                and not Path(item).expanduser().exists() and not _HUB_ID.match(item):
            raise InputError(f"step '{step}': model {item} is not a directory, a hub id or an "
                             "@step", where, "check the path, or write @<step> for an earlier "
                             f"step's output, or {EMBEDDED_NAMES}")


# ---------------------------------------------------------------- keys

def compute_keys(wf: Workflow) -> None:
    digests: dict[str, str] = {}
    keys: dict[str, str] = {}
    for step in wf.steps:
        params = {k: _keyed(v, k, keys, digests) for k, v in step.params.items()}
        params["sequence_start"] = RULE  # every step's data starts by it (quantize, eval...)
        step.key = make_key(f"workflow/{step.type}", {"steps": {d: keys[d] for d in step.deps}},
                            params)
        keys[step.name] = step.key
        step.entry = wf.cache_dir / f"{step.type}-{step.key[:16]}"


def _keyed(value: Any, option: str, keys: dict, digests: dict) -> Any:
    """An option value as it enters the key: refs by the key of their step, local files and
    directories by their content, everything else as parsed."""
    if isinstance(value, (list, tuple)):
        return [_keyed(v, option, keys, digests) for v in value]
    if not isinstance(value, str):
        return value
    ref = REF.match(value)
    if ref:
        return {"step": keys[ref.group(1)], "path": ref.group(2) or ""}
    if option == "model" and value in EMBEDDED_MODELS:
        return {"digest": _digest(embedded_path(value), digests)}
    parts = [p.strip() for p in value.split(",")] if "," in value else [value]
    if option != "text_template" and all(p and Path(p).expanduser().exists() for p in parts):
        found = [{"digest": _digest(Path(p).expanduser(), digests)} for p in parts]
        return found[0] if len(found) == 1 else found
    return value


def _digest(path: Path, cache: dict) -> str:
    real = str(path.resolve())
    if real not in cache:
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest and manifest.get("key"):  # a phitune output: its key says what it holds
            cache[real] = f"key:{manifest['key']}"
        elif path.name == "model" and (parent := read_manifest(path.parent)) and parent.get("key"):
            cache[real] = f"key:{parent['key']}/model"
        else:
            cache[real] = content_digest(path)
    return cache[real]


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
    from phitune.artifacts import check_not_overlapping
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
    from phitune.artifacts import changed_files
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
