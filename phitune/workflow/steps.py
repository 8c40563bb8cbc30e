"""A workflow file's `steps:` → `Step`s: names, types, `@name` refs between steps, input paths
(located beside the file when not found here, checked to exist) and each step's options
(`step_options`). Nothing runs and nothing is keyed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phitune import registry
from phitune.artifacts.embedded import EMBEDDED_MODELS, EMBEDDED_NAMES
from phitune.errors import InputError, OptionError
from phitune.workflow.step_options import StepReader, command_line, has_output, key_names

RESERVED = ("name", "type", "publish")
# Options naming input files that must exist (or be an @ref) before anything runs.
INPUT_PATHS = ("data_files", "calib_data", "eval_data", "adapter_path", "adapter", "text_file")
REF = re.compile(r"^@([A-Za-z0-9_][\w.-]*)(?:/(.*))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$")


@dataclass
class Step:
    """One step: its options as parsed (refs unresolved), what enters its key, its output."""

    name: str
    type: str
    values: dict                    # field → parsed value, every option but output/force;
                                    # refs still "@name[/sub]" (run.py resolves them)
    params: dict                    # the values that shape the output (the entry key's), by
                                    # the parameter names entry keys have always used
    deps: list[str]                 # names of the steps whose outputs it reads
    publish: bool
    has_output: bool = True         # the command writes -o itself (eval: the workflow
                                    # stores its figures as the entry's manifest)
    key: str = ""
    entry: Path | None = None
    bounds: dict = field(default_factory=dict)   # eval: max_ppl / max_latency_ms as parsed
    shown: list = field(default_factory=list)    # (field, value) as the file wrote them

    def command_line(self) -> str:
        return command_line(self.type, self.shown)


def step_entries(steps: Any, where: str) -> list[tuple[str, dict]]:
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


def build_step(name: str, spec: dict, earlier: list[str], all_names: list[str],
               source: Path) -> Step:
    """One step from its mapping: every key checked in file order, then the values parsed and
    their ranges checked, as the command line would."""
    where = f"{source}, step '{name}'"
    step_type = str(spec.get("type") or name)
    types = tuple(registry.STEPS)
    if step_type not in types:
        raise OptionError(f"step '{name}': unknown step type '{step_type}'", str(source),
                          f"use one of {', '.join(types)} as `type:` (or as the step name)")
    publish = spec.get("publish")
    if publish is not None and not isinstance(publish, bool):
        raise OptionError(f"step '{name}': publish must be true or false", where, "fix the value")
    reader = StepReader(name, step_type, source)
    deps: list[str] = []
    for key, value in spec.items():
        if key in RESERVED:
            continue
        option = reader.field(key)
        value = _locate_paths(value, option, source)
        for ref in _refs(value):
            deps.append(_check_ref(ref, name, key, earlier, all_names, where))
        _check_inputs(value, option, name, key, where)
        reader.take(option, key, value)
    values = reader.values()
    reader.check(values)
    stepdef = registry.step(step_type)
    bounds = {k: values.get(k) for k in stepdef.bounds}
    names = key_names(step_type)
    params = stepdef.without_unset({names[k]: v for k, v in values.items()
                                    if k not in registry.BOOKKEEPING and k not in bounds})
    return Step(name, step_type, values, params, list(dict.fromkeys(deps)), publish,
                has_output(step_type), bounds=bounds, shown=reader.shown)


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
