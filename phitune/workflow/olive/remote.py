"""What cannot run here: Azure ML or another non-local system, refused in one line naming
every such key before anything is translated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phitune.errors import OptionError
from phitune.workflow.olive.tables import AZURE_TYPES, NOT_LOCAL_SYSTEMS


def refuse_remote(raw: dict, source: Path) -> None:
    """One line naming every key that needs Azure ML or another system than this machine."""
    found: list[str] = []
    fixes: list[str] = []
    systems = raw.get("systems") if isinstance(raw.get("systems"), dict) else {}
    remote = set()
    for name, system in systems.items():
        kind = system.get("type") if isinstance(system, dict) else None
        if kind in NOT_LOCAL_SYSTEMS:
            remote.add(name)
            found.append(f"systems.{name} (type {kind})")
            fixes.append(f"remove or replace `systems.{name}`")
    engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
    for key in ("host", "target"):
        for where, value in ((f"engine.{key}", engine.get(key)), (key, raw.get(key))):
            if isinstance(value, str) and value in remote:
                found.append(f"{where} '{value}'")
    host = raw.get("workflow_host")
    if host is not None and not (isinstance(host, str) and host in systems and host not in remote):
        found.append("workflow_host")
        fixes.append("remove `workflow_host`")
    if "azureml_client" in raw:
        found.append("azureml_client")
        fixes.append("remove `azureml_client`")
    for path, kind in _azure_resources(raw, ""):
        if not path.startswith("systems."):
            found.append(f"{path} (type {kind})")
            fixes.append("use a local directory or hub id as model_path" if "model" in path
                         else "point data_files at a local file" if "data" in path
                         else f"replace `{path}` with a local path")
    if found:
        fixes = list(dict.fromkeys(fixes)) or ["remove them"]
        raise OptionError(f"this Olive config needs Azure ML or another remote system: "
                          f"{', '.join(dict.fromkeys(found))}", str(source),
                          "phitune runs on the local machine; " + "; ".join(fixes))


def _azure_resources(node: Any, path: str):
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and kind in AZURE_TYPES:
            yield path, kind
            return
        for key, value in node.items():
            yield from _azure_resources(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            name = value.get("name") if isinstance(value, dict) else None
            yield from _azure_resources(value, f"{path}[{name if name else i}]")
