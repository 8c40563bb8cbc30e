"""Read a workflow file (JSON or YAML) into a mapping, or refuse it in one line: missing, not
UTF-8, invalid syntax (with its line), nested too deeply, or a YAML document whose aliases
expand past `YAML_NODES` nodes or contain themselves. Nothing is imported but the parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phitune import inputfiles
from phitune.errors import InputError


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
