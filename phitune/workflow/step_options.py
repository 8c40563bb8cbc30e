"""A workflow step's mapping → its options dataclass, through the option fields the CLI reads.

No command line is built or parsed. The file names an option by any of its command-line
spellings without the dashes (`group_size`, `group-size`, `m` for `-m`) or by its parameter
name (`eval`), `options.by_spelling`. Each scalar is read by the field's own type exactly as
the command line reads the same text, `options.read_text`: YAML's `1e-3` (a string to YAML)
is a float, `0.5` is no integer and `true` no number, refused in click's words. A list gives a
repeatable option its values, or a text option one comma-joined value (`text_cols: [prompt,
response]`). What the file leaves out takes the field's default; then the declared ranges
(`options.from_kwargs`). Each error names the step and the file; the words and their order are
those the CLI gives for the same values.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from phitune import options, registry
from phitune.errors import OptionError

# Options a step of a workflow may not set, and why.
WORKFLOW_OWNED = {"output": "the workflow writes each step to <cache_dir>/<type>-<key> and links "
                            "the final ones into output_dir",
                  "force": "pass --force STEP to phitune run"}
GLOBAL_OPTIONS = ("json", "verbose", "v")   # the group's, for the whole run
PLACEHOLDER_OUTPUT = "<cache>"              # where the entry goes, before the key is known


class StepReader:
    """Reads one step's options from its mapping: `field` and `take` per key in file order,
    then `values` (every option parsed) and `check` (the declared ranges)."""

    def __init__(self, name: str, step_type: str, source: Path):
        self.name, self.type, self.source = name, step_type, source
        self.where = f"{source}, step '{name}'"
        self.cls = registry.step(step_type).options()
        self.fields = {f.name: (f, spec) for f, spec in options.specs(self.cls)}
        self.names = options.by_spelling(self.cls)
        self.given: dict[str, Any] = {}              # field → the file's value, file order
        self.shown: list[tuple[str, Any]] = []       # (field, value) for the command line shown

    def field(self, key: Any) -> str:
        """The field a key of the mapping names, or the one-line refusal."""
        norm = str(key).lstrip("-")
        found = self.names.get(norm) or self.names.get(norm.replace("-", "_"))
        if found is not None and found[0].name in WORKFLOW_OWNED:
            raise OptionError(f"step '{self.name}': option '{key}' is set by the workflow",
                              self.where, WORKFLOW_OWNED[found[0].name])
        if found is None and norm in GLOBAL_OPTIONS:
            raise OptionError(f"step '{self.name}': '{key}' is a global option, not a step's",
                              self.where, f"pass it to the run: phitune run --config "
                              f"{self.source} --{'verbose' if norm == 'v' else norm}")
        if found is None:
            raise OptionError(f"step '{self.name}' ({self.type}): unknown option '{key}'",
                              self.where, f"see 'phitune {self.type} --help' for its options")
        return found[0].name

    def take(self, name: str, key: Any, value: Any) -> None:
        """Keep `value` for the field `name` once its shape fits the option."""
        f, spec = self.fields[name]
        if value is None:   # as if not written: the default
            return
        if spec.flag or spec.negatable:
            if not isinstance(value, bool):
                raise OptionError(f"step '{self.name}': {key} takes true or false, not "
                                  f"{value!r}", self.where, f"write {key}: true")
        elif isinstance(value, dict):
            raise OptionError(f"step '{self.name}': {key} takes a value, not a mapping",
                              self.where, "fix the value")
        elif spec.multiple:
            items = value if isinstance(value, list) else [value]
            self.shown.append((name, items))
            self.given[name] = [*self.given.get(name, ()), *items]   # as --x a --x b
            return
        elif isinstance(value, list):   # --text_cols a,b / --target_modules q,k as a list
            if options.to_click(f, spec).type is not click.STRING \
                    or not all(isinstance(v, str) for v in value):
                raise OptionError(f"step '{self.name}': {key} takes one value, not a list",
                                  self.where, "write a single value")
            value = ",".join(value)
        self.given[name] = value     # a field spelled twice: the last value, as on the CLI
        self.shown.append((name, value))

    def values(self) -> dict[str, Any]:
        """Every option but the workflow's own, parsed: the file's first (in its order), then
        the defaults; a required one missing is refused."""
        parsed = {name: self._parse(name, value) for name, value in self.given.items()}
        for name, (f, spec) in self.fields.items():
            if name in parsed or name in WORKFLOW_OWNED:
                continue
            if spec.required:
                raise self._refused(click.MissingParameter(param=options.to_click(f, spec)))
            parsed[name] = options.default_of(f)
        return parsed

    def _parse(self, name: str, value: Any) -> Any:
        f, spec = self.fields[name]
        if isinstance(value, bool) and (spec.flag or spec.negatable):
            return value
        try:
            if spec.multiple:
                return tuple(options.read_text(f, spec, _text(v)) for v in value)
            return options.read_text(f, spec, _text(value))
        except click.ClickException as exc:
            raise self._refused(exc) from None

    def _refused(self, exc: click.ClickException) -> OptionError:
        return OptionError(f"step '{self.name}' ({self.type}): {exc.format_message()}",
                           str(self.source), f"see 'phitune {self.type} --help'")

    def check(self, values: dict[str, Any]) -> None:
        """The declared ranges and choices, as on the command line, before any step runs."""
        try:
            build(self.type, values, PLACEHOLDER_OUTPUT)
        except OptionError as exc:
            raise OptionError(f"step '{self.name}' ({self.type}): {exc.what}",
                              str(self.source), exc.fix) from None


def build(step_type: str, values: dict[str, Any], output: str | None = None,
          force: bool = False) -> Any:
    """The step's options dataclass from parsed values (refs resolved by the caller), its
    ranges checked; `output` for a step that writes one."""
    cls = registry.step(step_type).options()
    extra = {"output": output, "force": force} if has_output(step_type) else {}
    return options.from_kwargs(cls, values | extra)


def has_output(step_type: str) -> bool:
    """Whether the step writes -o itself (eval does not: the workflow stores its figures)."""
    return any(f.name == "output" for f, _ in options.specs(registry.step(step_type).options()))


def key_names(step_type: str) -> dict[str, str]:
    """field → the parameter name a workflow entry's key has always used for it (`eval_`)."""
    return {f.name: spec.dest or f.name
            for f, spec in options.specs(registry.step(step_type).options())}


def command_line(step_type: str, shown: list[tuple[str, Any]]) -> str:
    """The `phitune <type> ...` equivalent of the step, for `--dry-run`'s reader only."""
    fields = {f.name: (f, spec) for f, spec in options.specs(registry.step(step_type).options())}
    args: list[str] = []
    for name, value in shown:
        f, spec = fields[name]
        flag = options.long_spellings(f, spec)[0]
        if spec.flag or spec.negatable:
            args += [flag] if value else [f"--no-{flag[2:]}"] if spec.negatable else []
        elif spec.multiple:
            args += [a for item in value for a in (flag, _text(item))]
        else:
            args += [flag, _text(value)]
    shown_args = [a.replace("\n", "\\n").replace("\t", "\\t") for a in args]
    return shlex.join(["phitune", step_type, *shown_args])


def _text(value: Any) -> str:
    """A value as the command line would spell it (YAML's true → `true`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

