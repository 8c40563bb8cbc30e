"""onnxruntime-genai's model builder, run as a subprocess.

A subprocess because importing the builder in-process puts its top-level `builders` and
`quantization` packages on sys.path, and because its peak memory is then the child's alone
(measured with RUSAGE_CHILDREN) and returned to the OS when it exits.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from phitune import architectures, children, oserrors, ui
from phitune.errors import ExportError, InputError, UnsupportedModelError

# the build target (auto-opt --device) → the builder's -e
EXECUTION_PROVIDERS = {"cpu": "cpu", "gpu": "cuda"}


def run_builder(source: Path, out_dir: Path, precision: str, target: str, work_dir: Path,
                extra_options: dict[str, str]) -> float:
    """Build `out_dir` from the Hugging Face dir `source`; returns the builder's peak RSS (MB).
    The builder runs inside `work_dir`, so every path it is given is made absolute first."""
    source, out_dir, work_dir = (Path(p).absolute() for p in (source, out_dir, work_dir))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
    settings = config_settings(source)
    if settings:  # the same builder, with these set on the config it reads (builder_child.py)
        settings_file = work_dir / "builder-config.json"
        settings_file.write_text(json.dumps(settings, indent=1))
        cmd = [sys.executable, "-m", "phitune.export.builder_child", str(settings_file)]
    cmd += ["-i", str(source), "-o", str(out_dir), "-p", precision, "-e", EXECUTION_PROVIDERS[target],
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


def config_settings(source: Path) -> dict:
    """Config attributes the builder must be given for `source`'s family (its table record's
    builder_config), resolved from the config as transformers loads it; {} for most families.
    Refuses a model the builder would build wrongly."""
    config_file = source / "config.json"
    family = architectures.family_of_config(json.loads(config_file.read_text()))
    spec = family.builder_config if family is not None else None
    if spec is None:
        return {}
    from transformers import AutoConfig
    loaded = AutoConfig.from_pretrained(str(source)).to_dict()
    for a, b in spec.agree:
        if _at(loaded, a) != _at(loaded, b):
            raise UnsupportedModelError(
                f"{family.classes[0]} with {a}={_at(loaded, a)!r} but {b}={_at(loaded, b)!r} "
                f"cannot be exported: {spec.refusal}", str(config_file),
                "only models whose two values agree export with this builder")
    missing = [path for _, path in spec.attrs if _at(loaded, path) is None]
    if missing:
        raise UnsupportedModelError(f"{family.classes[0]} config has no {', '.join(missing)}",
                                    str(config_file), "report it: the family's builder_config in "
                                    "phitune/architectures.py needs updating")
    return {name: _at(loaded, path) for name, path in spec.attrs}


def _at(config: dict, path: str):
    """The value at a dotted path in a nested dict, None where any step is missing."""
    value = config
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _last_error(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"
