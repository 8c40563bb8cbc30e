"""Each step's options are declared once, as fields of its options dataclass: name, type,
default, choices, range and help live in the field (`option(...)`), the way peft's LoraConfig
keeps them in `field(metadata=...)`. The click command (`command`), the names and values a
workflow file may give (`by_spelling`, `read_text`: `phitune.workflow.step_options` builds the
dataclass from them, no command line in between), range checks (`validate`) and manifest
params (`params`) derive from it.

This module is a shared library: it imports click and the standard library only, so the
workflow layer can parse a step's options without importing `phitune.cli`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from phitune.errors import OptionError

_KEY = "phitune.option"
CONTEXT = {"help_option_names": ["-h", "--help"]}


@dataclass(frozen=True)
class Spec:
    """How one field reads on a command line."""

    help: str | None = None
    type: Any = None                 # a Python type or a click type; None: the default's type
    choices: tuple | None = None
    flag: bool = False               # --x (True when given)
    negatable: bool = False          # --x/--no-x (default may be None: "decide for me")
    multiple: bool = False
    metavar: str | None = None
    short: str | None = None         # "-m"
    aliases: tuple[str, ...] = ()    # more spellings, e.g. "--output_path"
    spellings: tuple[str, ...] = ()  # the long spellings in --help order, when not the usual
    dashed: bool = True              # also spelled --like-this
    dest: str | None = None          # the click parameter name when it differs (eval → eval_)
    required: bool = False
    show_default: bool | None = None
    min: float | None = None         # inclusive bounds, checked by `validate` before any load
    max: float | None = None
    below: float | None = None       # exclusive upper bound
    above: float | None = None       # exclusive lower bound
    also: tuple = ()                 # values accepted outside the bounds (max_steps -1: epochs)
    among: tuple | None = None       # the only numeric values accepted (bits, group sizes)
    ranged: bool = False             # click itself refuses values out of the bounds
    envvar: str | None = None        # read from this environment variable when not given


def option(default: Any = None, help: str | None = None, **spec: Any) -> Any:
    """A dataclass field that is also a command-line option (see Spec for the keywords)."""
    meta = {_KEY: Spec(help=help, **spec)}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(help: str | None = None, **spec: Any) -> Any:
    """A field without a default that the command line must give."""
    return field(metadata={_KEY: Spec(help=help, required=True, **spec)})


def specs(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """The option fields of `cls` in --help order (`cls.ORDER` first when it sets one)."""
    found = [(f, _with_help(cls, f.name, f.metadata[_KEY]))
             for f in dataclasses.fields(cls) if _KEY in f.metadata]
    order = getattr(cls, "ORDER", ())
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda fs: rank.get(fs[0].name, len(order)))


def _with_help(cls: type, name: str, spec: Spec) -> Spec:
    """A step may word an inherited option's help its own way (finetune vs eval records)."""
    text = getattr(cls, "HELP", {}).get(name)
    return dataclasses.replace(spec, help=text) if text is not None else spec


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def long_spellings(f: dataclasses.Field, spec: Spec) -> list[str]:
    """`--group_size`, `--group-size`: the first is the one help and messages show."""
    return list(spec.spellings) or \
        [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if spec.dashed and "_" in f.name
                           else [])


def spellings(f: dataclasses.Field, spec: Spec) -> list[str]:
    """Every way to write the option (`-m`, `--model`, aliases), negations aside."""
    return ([spec.short] if spec.short else []) + long_spellings(f, spec) + list(spec.aliases)


def by_spelling(cls: type) -> dict[str, tuple[dataclasses.Field, Spec]]:
    """What a workflow file may name an option: any spelling without its dashes (`m`, `model`,
    `group-size`, `group_size`, `output_path`) and the parameter name (`eval_`, `eval`)."""
    names: dict[str, tuple[dataclasses.Field, Spec]] = {}
    for f, spec in specs(cls):
        for spelling in spellings(f, spec):
            bare = spelling.lstrip("-")
            names.setdefault(bare, (f, spec))
            names.setdefault(bare.replace("-", "_"), (f, spec))
        dest = spec.dest or f.name
        names.setdefault(dest, (f, spec))
        names.setdefault(dest.rstrip("_"), (f, spec))
    return names


def to_click(f: dataclasses.Field, spec: Spec) -> click.Option:
    """The click option of one field; its spellings as the commands have always had them."""
    dest = spec.dest or f.name
    opts = [spec.short] if spec.short else []
    long = long_spellings(f, spec)
    default = default_of(f)
    kwargs: dict[str, Any] = {"help": spec.help, "metavar": spec.metavar}
    if spec.envvar:
        kwargs.update(envvar=spec.envvar, show_envvar=True)
    if spec.negatable:
        opts += [f"{s}/--no-{s[2:]}" for s in long]
        kwargs.update(default=default)
    elif spec.flag:
        opts += long
        kwargs.update(is_flag=True)
    else:
        opts += long
        kwargs.update(required=spec.required, multiple=spec.multiple,
                      type=_click_type(spec, default))
        if not spec.required:  # click ≥ 8.3 counts an explicit default=None as a given value
            kwargs["default"] = () if spec.multiple else default
    opts += list(spec.aliases)
    show = spec.show_default
    if show is None:
        show = default is not None and not spec.flag and not spec.multiple and not spec.required
    return click.Option(opts + [dest], show_default=show, **kwargs)


def _click_type(spec: Spec, default: Any) -> Any:
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    if spec.ranged:
        low = spec.min if spec.min is not None else spec.above
        kind = click.IntRange if (spec.type or type(default)) is int else click.FloatRange
        extra = {"min_open": True} if spec.above is not None and kind is click.FloatRange else {}
        return kind(min=low, max=spec.max, **extra)
    if spec.type is not None:
        return spec.type
    if default is not None and not isinstance(default, (tuple, list)):
        return type(default)
    return None


def read_text(f: dataclasses.Field, spec: Spec, text: str) -> Any:
    """One value of the option as the command line reads `text` (the field's click type), so
    that a workflow file's `1e-3` (a string to YAML) is a float, and its `0.5` no integer, as
    on the command line; click.BadParameter says why not."""
    param = to_click(f, spec)
    return param.type.convert(text, param, None)


def from_kwargs(cls: type, kwargs: dict) -> Any:
    """`cls` from click's values (dest names like eval_ map back to their fields)."""
    names = {spec.dest or f.name: f.name for f, spec in specs(cls)}
    opts = cls(**{names.get(k, k): v for k, v in kwargs.items()})
    validate(opts)  # every command and every `run --config` step passes here before it runs
    return opts


def validate(opts: Any) -> None:
    """Every declared range and choice, checked before a model loads (`from_kwargs` calls it:
    the CLI and `run --config` alike; a step's `run` may call it again for callers in code)."""
    for f, spec in specs(type(opts)):
        check_value(f.name, spec, getattr(opts, f.name))


def check_field(cls: type, name: str, value: Any) -> None:
    """`value` against the declaration of `cls`'s option `name` (for library functions that
    take the option as an argument)."""
    spec = next(s for f, s in specs(cls) if f.name == name)
    check_value(name, spec, value)


def check_value(name: str, spec: Spec, value: Any) -> None:
    """One option's value against its declaration; an OptionError naming the option."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return
    flag = f"--{name}"
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{flag} {value} is not one of {', '.join(map(str, spec.choices))}",
                          flag, f"use one of {', '.join(map(str, spec.choices))}")
    if isinstance(value, str) or value in spec.also:
        return
    bounded = any(b is not None for b in (spec.min, spec.max, spec.above, spec.below, spec.among))
    if bounded and isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{flag} {value} is not a finite number", flag, _fix(spec))
    if spec.among is not None and value not in spec.among:
        raise OptionError(f"{flag} {value} is not supported", flag, _fix(spec))
    if (spec.min is not None and value < spec.min or spec.max is not None and value > spec.max
            or spec.above is not None and value <= spec.above
            or spec.below is not None and value >= spec.below):
        raise OptionError(f"{flag} {value} is out of range ({_range(spec)})", flag, _fix(spec))


def _range(spec: Spec) -> str:
    low = f"≥ {spec.min:g}" if spec.min is not None else \
        f"> {spec.above:g}" if spec.above is not None else None
    high = f"≤ {spec.max:g}" if spec.max is not None else \
        f"< {spec.below:g}" if spec.below is not None else None
    text = " and ".join(p for p in (low, high) if p) or "any number"
    if spec.also:
        text += f", or {' or '.join(map(str, spec.also))}"
    return text


def _fix(spec: Spec) -> str:
    if spec.among is not None:
        return f"use one of {', '.join(map(str, spec.among))}"
    return f"pass a value {_range(spec)}"


def params(opts: Any, exclude: tuple[str, ...] = ()) -> dict:
    """The option values that shape a step's output (its manifest params and cache key)."""
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in exclude}


# ---------------------------------------------------------------- options several steps share

MODEL_HELP = ("Model: a directory, a .gguf file, a hub id, or an embedded model: 'tiny-phi3', "
              "'smollm2-135m-instruct'.")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def model(help: str = MODEL_HELP) -> Any:
    return required(help, short="-m", metavar="PATH|ID", dashed=False)


def output() -> Any:
    return required("Output directory (written atomically).", short="-o", metavar="DIR",
                    dashed=False, aliases=("--output_path",),
                    type=click.Path(file_okay=True, dir_okay=True))


def force() -> Any:
    return option(False, "Redo the step even if the output is up to date.", flag=True)


def device() -> Any:
    return option("auto", "Where to compute; auto takes CUDA when present.",
                  choices=("auto", "cpu", "cuda"))


def dtype(help: str) -> Any:
    return option("auto", help, choices=DTYPES)


def compile(what: str, from_params: str, unless: str = "") -> Any:  # noqa: A001 - option name
    """--compile/--no-compile; unset, the step decides (compiling.choose_compile)."""
    return option(None, f"torch.compile {what} (default: on for {from_params}+ parameter models "
                  f"on CPU with a C++ compiler{unless}).", negatable=True, dashed=False)


class OptionsCommand(click.Command):
    """A click command whose options come from an options dataclass, imported only when the
    command parses or shows its own --help: `phitune --help` lists every command without
    importing the modules that declare their options."""

    def __init__(self, *args: Any, load: Callable[[], type], **kwargs: Any):
        self._load = load
        self._params: list | None = None
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def params(self) -> list:
        if self._params is None:
            self._params = [to_click(f, s) for f, s in specs(self._load())]
        return self._params

    @params.setter
    def params(self, value: list) -> None:
        self._params = list(value) or None


def command(name: str | None, load: Callable[[], type]) -> Callable[[Callable], click.Command]:
    """`@options.command("auto-opt", lambda: AutoOptOptions)` over a function taking the
    options as keyword arguments; its docstring is the command's help."""
    import inspect

    def make(callback: Callable) -> click.Command:
        return OptionsCommand(name or callback.__name__.replace("_", "-"), load=load,
                              callback=callback, help=inspect.getdoc(callback),
                              context_settings=CONTEXT)
    return make
