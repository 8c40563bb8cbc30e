"""`phitune cache ls|clean`: the step outputs `phitune run` keeps, and pruning them."""

from __future__ import annotations

import click


def _cache_dir_options(f):
    f = click.option("--config", "config", metavar="FILE",
                     help="Use the cache_dir of this workflow / Olive config.")(f)
    f = click.option("--cache_dir", "--cache-dir", "cache_dir", metavar="DIR",
                     help="The cache directory (default: .phitune-cache).")(f)
    f = click.option("--gguf", is_flag=True,
                     help="The GGUF conversions (-m FILE.gguf) in $PHITUNE_CACHE/gguf "
                          "(default ~/.cache/phitune/gguf) instead.")(f)
    return f


def _path(cache_dir: str | None, config: str | None, gguf: bool):
    if gguf:
        from phitune.artifacts.gguf import conversions_dir
        return conversions_dir()
    return _resolve(cache_dir, config)


def _resolve(cache_dir: str | None, config: str | None):
    from pathlib import Path

    from phitune.errors import OptionError
    from phitune.workflow.plan import DEFAULT_CACHE_DIR
    if cache_dir:
        path = Path(cache_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise OptionError(f"{cache_dir} is a file, not a cache directory", "--cache_dir",
                              "pass the directory phitune run caches into (default .phitune-cache)")
        return path
    if config:
        from phitune.workflow.files import read_config
        raw = read_config(config)
        if "steps" in raw:
            return Path(raw.get("cache_dir") or DEFAULT_CACHE_DIR).expanduser()
        engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
        return Path(engine.get("cache_dir") or raw.get("cache_dir")
                    or DEFAULT_CACHE_DIR).expanduser()
    return Path(DEFAULT_CACHE_DIR)


@click.group("cache", context_settings={"help_option_names": ["-h", "--help"]})
def cache() -> None:
    """List and prune the cache of `phitune run` (<cache_dir>/<type>-<key> per step).

    \b
    An entry is in use while the last run of a workflow whose output_dir still exists used
    it, or while an entry in use links into it (a finetune's model/ → its quantize entry).
      phitune cache ls
      phitune cache clean --unused            # what no workflow output uses
      phitune cache clean --older-than 7d     # not used by any run for a week
      phitune cache clean --all
    --gguf: the same for the GGUF files `-m FILE.gguf` converted (made again when next used):
      phitune cache ls --gguf; phitune cache clean --gguf --older-than 30d
    """


@cache.command("ls", context_settings={"help_option_names": ["-h", "--help"]})
@_cache_dir_options
def ls(cache_dir: str | None, config: str | None, gguf: bool) -> None:
    """List the entries: type, size, last use, and which workflow outputs use them."""
    from rich.table import Table

    from phitune import ui
    from phitune.workflow.cache import entries, leftovers

    path = _path(cache_dir, config, gguf)
    found = entries(path)
    if ui.json_mode():
        import json
        ui.emit(json.dumps({"cache_dir": str(path), "entries": [e.row() for e in found]},
                           indent=2) + "\n")
    say = lambda line: ui.console.print(line, soft_wrap=True, markup=False, highlight=False)
    say(f"{path}: {len(found)} {'entry' if len(found) == 1 else 'entries'}, "
        f"{sum(e.size_mb for e in found):.1f} MB")
    if found:
        table = Table(show_header=True)
        table.add_column("entry", no_wrap=True)
        for column in ("artifact", "MB", "last used", "used by"):
            table.add_column(column, overflow="fold")
        for e in found:
            row = e.row()
            used = ", ".join(e.used_by) or ("linked by an entry" if _linked(e, found) else "—")
            table.add_row(e.name, e.artifact, f"{e.size_mb:.1f}", row["last_used"], used)
        ui.console.print(table)
    for leftover, why in leftovers(path):
        say(f"{leftover.name}: " + ("checkpoint of an interrupted finetune" if why == "checkpoint"
                                    else "leftover of a killed run"))
    if not gguf:
        from phitune.artifacts.gguf import conversions_dir
        converted = entries(conversions_dir())
        if converted:
            say(f"{conversions_dir()}: {len(converted)} GGUF conversion(s), "
                f"{sum(e.size_mb for e in converted):.1f} MB (phitune cache ls --gguf)")


def _linked(entry, found) -> bool:
    return any(entry.name in other.links_to for other in found)


@cache.command("clean", context_settings={"help_option_names": ["-h", "--help"]})
@_cache_dir_options
@click.option("--all", "all_", is_flag=True, help="Remove every entry.")
@click.option("--unused", is_flag=True, help="Remove entries no workflow output uses.")
@click.option("--older-than", "--older_than", "older_than", metavar="AGE",
              help="Remove entries no run used for AGE (30m, 12h, 7d, 2w); with --unused, both.")
@click.option("--dry-run", "--dry_run", "dry_run", is_flag=True,
              help="Say what would be removed; remove nothing.")
def clean(cache_dir: str | None, config: str | None, gguf: bool, all_: bool, unused: bool,
          older_than: str | None, dry_run: bool) -> None:
    """Remove cache entries (never one that a kept entry links into)."""
    from phitune import ui
    from phitune.workflow import cache as cache_mod

    path = _path(cache_dir, config, gguf)
    age = cache_mod.parse_age(older_than) if older_than is not None else None
    result = cache_mod.clean(path, all_=all_, unused=unused, older_than=age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for name in result["removed"]:
        ui.console.print(f"{verb} {path / name}", soft_wrap=True, markup=False, highlight=False)
    for name in result["kept_linked"]:
        ui.console.print(f"kept {path / name}: a kept entry links into it", soft_wrap=True,
                         markup=False, highlight=False)
    ui.summary(f"cache clean {path}", {"entries_" + verb.replace(" ", "_"): len(result["removed"]),
                                       "freed_mb": result["freed_mb"],
                                       "leftovers": len(result["leftovers"]), "dry_run": dry_run})
