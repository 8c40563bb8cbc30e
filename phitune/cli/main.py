"""The `phitune` command group.

Subcommands load lazily so that `phitune --help` never imports torch or transformers;
errors a user can fix print one line and exit 2, bugs keep their traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from phitune import __version__, registry

# name → (module, click command in it). The steps a workflow can run come from the step
# registry (phitune/registry.py), each with a module phitune/cli/<name>.py naming its command
# `command`; the rest are the CLI's own.
COMMANDS = {
    **{name: (f"phitune.cli.{name.replace('-', '_')}", "command") for name in registry.STEPS},
    "infer": ("phitune.cli.infer", "infer"),
    "export-adapter": ("phitune.cli.export_adapter", "export_adapter"),
    "run": ("phitune.cli.run", "run"),
    "cache": ("phitune.cli.cache", "cache"),
    "serve": ("phitune.cli.serve", "serve"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else None
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            from phitune.errors import OptionError
            close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
            raise OptionError(f"no such command '{name}'", "phitune",
                              (f"did you mean '{close[0]}'? " if close else "")
                              + "see 'phitune --help'")
        return super().resolve_command(ctx, args)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        command = getattr(importlib.import_module(module), attr)
        if GLOBAL_NOTE not in (command.epilog or ""):  # its --help then names them too
            command.epilog = f"{command.epilog}\n\n{GLOBAL_NOTE}" if command.epilog else GLOBAL_NOTE
        return command


GLOBAL_NOTE = "Global options --json, -v/--verbose and --version work here too (see phitune --help)."


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="phitune")
@click.option("-v", "--verbose", is_flag=True, help="Show debug output and library warnings.")
@click.option("--json", "json_output", is_flag=True,
              help="Print a machine-readable summary on stdout.")
def cli(verbose: bool, json_output: bool) -> None:
    """phitune: quantize, fine-tune, export and run small language models.

    \b
    Each step reads a path and writes a self-describing directory, so steps chain:
      phitune quantize -m tiny-phi3 --algorithm awq -o models/tiny/awq
    The options below go before or after the subcommand: phitune infer ... --json.
    """
    from phitune import ui
    ui.configure(verbose=verbose, json_output=json_output, guard_stdout=not _HELP_ASKED[0])
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    # transformers, and torchao/torch when an optional AWQ kernel library pulled them in.
    for name in ("transformers", "torchao", "torch.utils._pytree", "gptqmodel"):
        logging.getLogger(name).setLevel(logging.ERROR)


# Commands whose speed is memory bandwidth (decoding): run with huge pages (hugepages.py).
HUGE_PAGE_COMMANDS = {"infer", "serve"}


def _command(args: list[str]) -> str | None:
    """The subcommand in a command line: the group's own options are all flags."""
    return next((a for a in args if not a.startswith("-")), None)


_HELP_ASKED = [False]  # `phitune CMD --help` prints its help on stdout, like any CLI

# The group's own options, which users also put at the end of a command line.
GLOBAL_FLAGS = ("--json", "-v", "--verbose", "--version")


def hoist_global_flags(args: list[str]) -> list[str]:
    """`phitune infer -m D --json` means `phitune --json infer -m D`: click reads the group's
    options only before the subcommand, so global flags found after it move to the front.
    A token that is an option's value (`--prompt --json`) or follows `--` stays where it is;
    the subcommand's options are read from its click definition to know which take values."""
    first = _command(args)
    if first is None or not any(a in GLOBAL_FLAGS for a in args[args.index(first) + 1:]):
        return args  # the common case decides without importing any subcommand
    moved, kept = [], []
    command: click.Command = cli
    takes: dict[str, int] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            kept += args[i:]
            break
        if arg in GLOBAL_FLAGS and command is not cli:
            moved.append(arg)
        elif arg in takes:  # an option and its value(s), whatever they look like
            kept += args[i:i + 1 + takes[arg]]
            i += takes[arg]
        else:
            if not arg.startswith("-") and isinstance(command, click.Group):
                sub = command.get_command(None, arg)  # type: ignore[arg-type]
                if sub is not None:
                    command, takes = sub, _value_options(sub)
            kept.append(arg)
        i += 1
    return moved + kept


def _value_options(command: click.Command) -> dict[str, int]:
    """Option spelling → how many values follow it."""
    return {spelling: param.nargs for param in command.params
            if isinstance(param, click.Option) and not param.is_flag and not param.count
            for spelling in param.opts}


def main(argv: list[str] | None = None) -> None:
    from phitune.errors import PhituneError
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    _HELP_ASKED[0] = any(a in ("-h", "--help") for a in args)
    if argv is None and not _HELP_ASKED[0] and _command(sys.argv[1:]) in HUGE_PAGE_COMMANDS:
        from phitune import hugepages
        hugepages.reexec()  # this process, run again with huge pages on: see hugepages.py
    stdout = sys.stdout  # ui.configure points sys.stdout at stderr while a command runs
    try:
        code = cli.main(args=args, prog_name="phitune", standalone_mode=False)
    except PhituneError as exc:
        _fail(exc.line(), exc.exit_code)
    except click.ClickException as exc:  # bad flags, missing options, bad values
        path = exc.ctx.command_path.split() if getattr(exc, "ctx", None) else []
        where = " ".join(["phitune"] + path[1:])  # the group's own path is just its name
        _fail(f"error: {exc.format_message()} — {where} — see '{where} --help'", exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        _fail("error: interrupted — no output was published", 130)
    except Exception as exc:  # a full/read-only disk or a damaged file, met outside a step's
        from phitune import oserrors  # own checks: one line (oserrors.py); else a bug
        error = oserrors.translate(exc)
        if error is None:
            raise
        _fail(error.line(), error.exit_code)
    finally:
        sys.stdout = stdout
    sys.exit(code if isinstance(code, int) else 0)


def _fail(line: str, code: int) -> None:
    from phitune import ui
    ui.error_line(line)
    sys.exit(code)
