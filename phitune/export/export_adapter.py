"""Convert a PEFT adapter for an existing auto-opt base: checked, then written atomically.

Not a step of the registry (phitune/registry.py says why): it writes one file, not an
artifact dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from phitune import oserrors
from phitune.artifacts.kinds import check_files_regular
from phitune.artifacts.output import check_not_overlapping, check_parent_writable, probe_writable
from phitune.artifacts.resolve import resolve_model
from phitune.errors import InputError, OutputError
from phitune.export.options import ExportAdapterOptions
from phitune.measure import Stopwatch


def run(opts: ExportAdapterOptions) -> dict:
    """Write `opts.output` from `opts.adapter`, checked against `opts.base`'s graph; returns
    the metrics."""
    from phitune.export.adapter import convert
    adapter, base, output, force = opts.adapter, opts.base, opts.output, opts.force
    watch = Stopwatch()
    out = Path(output).expanduser()
    if out.is_dir():
        raise OutputError(f"{output} is a directory", "-o", "pass a file path ending in .onnx_adapter")
    if out.suffix != ".onnx_adapter":
        raise OutputError(f"{output} does not end in .onnx_adapter", "-o",
                          "name the file NAME.onnx_adapter (infer uses NAME as the adapter's name)")
    if out.exists() and not force:
        raise OutputError(f"{output} already exists", "-o", "pass --force to overwrite it")
    if not out.parent.is_dir():
        raise OutputError(f"no such directory: {out.parent}", "-o", "create it first")
    adapter_dir = Path(adapter).expanduser()
    if not adapter_dir.is_dir():
        raise InputError(f"no such adapter directory: {adapter}", "-a",
                         "pass the adapter/ dir written by phitune finetune")
    # -o ends in .onnx_adapter, so it can't be one of the base's graph files; a new file beside
    # the graph is the normal use. Writing into the adapter dir being read is refused.
    check_files_regular(adapter_dir)  # a FIFO adapter_model.safetensors: said, not "missing"
    check_not_overlapping(out, [adapter_dir])
    check_parent_writable(out)
    probe_writable(out)  # a real mkdir beside -o, before the base graph is read
    model = resolve_model(base, accept=("onnx-genai",), step="export-adapter")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with oserrors.writing(out):
            metrics = convert(adapter_dir, model.path, tmp)
            os.replace(tmp, out)
    finally:
        oserrors.quietly(tmp.unlink, True)  # on a full or read-only disk: no second error
    return metrics | {"size_mb": round(out.stat().st_size / 2**20, 2), "seconds": round(watch.seconds, 2)}
