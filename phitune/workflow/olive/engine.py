"""Where the passes run: the engine's keys (also at the top level in newer Olive files) and
the execution providers, from the engine or the host/target system's accelerators, applied to
the auto-opt steps of ModelBuilder passes.
"""

from __future__ import annotations

from phitune.export.options import PROVIDERS  # Olive names the execution providers as auto-opt does
from phitune.workflow.olive.tables import ENGINE_KEYS
from phitune.workflow.olive.translation import Translation


def engine(t: Translation) -> dict:
    raw = t.raw
    engine = raw.get("engine") or {}
    if not isinstance(engine, dict):
        t.fail("engine", "is not a mapping", "write engine as a mapping")
    merged = {k: raw[k] for k in ENGINE_KEYS if k in raw}  # newer Olive: at the top level
    merged.update(engine)
    prefix = {k: ("engine" if k in engine else "") for k in merged}
    for key, value in merged.items():
        path = f"{prefix[key]}.{key}" if prefix[key] else key
        if key in ("cache_dir", "output_dir", "execution_providers", "host", "target"):
            continue
        if key == "search_strategy" and not value:
            continue  # no search: what phitune does
        if key in ("evaluator", "evaluate_input_model"):
            t.note(path, "not applied (add a phitune eval step to measure)")
        elif key in ENGINE_KEYS:
            t.note(path)
        else:
            t.note(path, "unknown key, not applied")
    merged["_eps"] = _providers(t, merged, prefix)
    return merged


def _providers(t: Translation, engine: dict, prefix: dict) -> list[tuple[str, str]]:
    """[(execution provider, key path)] from the engine, or the host/target system."""
    eps = engine.get("execution_providers")
    if eps:
        path = f"{prefix['execution_providers'] + '.' if prefix['execution_providers'] else ''}" \
               "execution_providers"
        eps = [eps] if isinstance(eps, str) else eps
        return [(str(ep), path) for ep in eps]
    systems = t.raw.get("systems") or {}
    found = []
    for name in dict.fromkeys([engine.get("target"), engine.get("host")]):
        system = systems.get(name) if isinstance(name, str) else None
        if not isinstance(system, dict):
            continue
        config = {**(system.get("config") or {}), **{k: v for k, v in system.items()
                                                    if k not in ("type", "config")}}
        base = f"systems.{name}" + (".config" if "config" in system else "")
        for key in config:
            if key != "accelerators":
                t.note(f"{base}.{key}")
        for i, acc in enumerate(config.get("accelerators") or []):
            acc = {"device": acc} if isinstance(acc, str) else acc
            for ep in acc.get("execution_providers") or []:
                found.append((str(ep), f"{base}.accelerators[{i}].execution_providers"))
            if not acc.get("execution_providers") and acc.get("device"):
                device = str(acc["device"]).lower()
                ep = "CUDAExecutionProvider" if device == "gpu" else "CPUExecutionProvider"
                found.append((ep, f"{base}.accelerators[{i}].device"))
    return found


def apply_providers(t: Translation, builders: list[dict], eps: list[tuple[str, str]]) -> None:
    if not eps:
        return
    if not builders:
        for _, path in dict.fromkeys(eps):
            t.note(path, "no ModelBuilder pass to apply it to; not applied")
        return
    ep, path = eps[0]
    if ep not in PROVIDERS:
        t.fail(path, f"{ep} is not supported", "phitune auto-opt targets "
               f"{' or '.join(PROVIDERS)}")
    for step in builders:
        step["device"] = PROVIDERS[ep]
        step["provider"] = ep
    for other, opath in eps[1:]:
        t.note(opath, f"{other}: phitune builds for the first provider ({ep}); not applied")
