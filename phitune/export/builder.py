"""onnxruntime-genai's model builder, run as a subprocess.

A subprocess because importing the builder in-process puts its top-level `builders` and
`quantization` packages on sys.path, and because its peak memory is then the child's alone
(measured with RUSAGE_CHILDREN) and returned to the OS when it exits.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from phitune import children, oserrors, ui
from phitune.errors import ExportError, InputError

EXECUTION_PROVIDERS = {"cpu": "cpu", "gpu": "cuda"}


def run_builder(source: Path, out_dir: Path, precision: str, device: str, work_dir: Path,
                extra_options: dict[str, str]) -> float:
    """Build `out_dir` from the Hugging Face dir `source`; returns the builder's peak RSS (MB).
    The builder runs inside `work_dir`, so every path it is given is made absolute first."""
    source, out_dir, work_dir = (Path(p).absolute() for p in (source, out_dir, work_dir))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source),
           "-o", str(out_dir), "-p", precision, "-e", EXECUTION_PROVIDERS[device],
           "-c", str(work_dir / "builder-cache")]
    if extra_options:
        cmd += ["--extra_options"] + [f"{k}={v}" for k, v in extra_options.items()]
    log_file = work_dir / "builder.log"
    ui.debug(" ".join(cmd))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    with open(log_file, "w") as log:  # the child dies with phitune (children.py)
        proc = children.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir, env=env)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        last = _last_error(log_file)
        problem = oserrors.translate(OSError(last))
        if problem is not None and not isinstance(problem, InputError):
            # the disk filled up or went read-only under the builder: an OS error, which the
            # step's output staging reports against -o (oserrors.writing)
            raise OSError(f"the model builder: {last}")
        raise ExportError(f"the onnxruntime-genai model builder failed: {_last_error(log_file)}",
                          f"building {source}", "run with -v to see the builder's log; "
                          "report it if the model is a supported architecture")
    if not any(out_dir.glob("*.onnx")):
        raise ExportError(f"the onnxruntime-genai model builder wrote no ONNX graph "
                          f"({_last_error(log_file)})", f"building {source}",
                          "run with -v to see the builder's log; report it")
    return peak_mb


def _last_error(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"
