"""The CUDA paths of phitune, run for real through its CLI, in one table (issue 32).

    bash scripts/cuda_check.sh                     # on a CUDA machine: the five paths, ≤ 10 min
    bash scripts/cuda_check.sh --rehearse-on-cpu   # the same paths with device cpu, small sizes

Each path is a function in scripts/cuda_paths.py that runs `phitune` commands in child
processes. The table gives each path's result, wall time, and peak memory: on CUDA the
largest torch.cuda.max_memory_allocated() of its children and the GPU's used memory polled
with nvidia-smi (which also sees onnxruntime's and the builder's allocations); on CPU the
children's peak RSS. Exit: 0 all passed, 1 any failed, 3 none failed but some were blocked.
Without CUDA (and no --rehearse-on-cpu) it prints one line and exits 0 (scripts/cuda_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cuda_paths import PATHS, Blocked, Check, Failed


class SmiPoll:
    """The GPU's used memory, polled with nvidia-smi while a path runs (max over the run)."""

    def __init__(self):
        self.exe = shutil.which("nvidia-smi")
        self.peak, self._stop = 0.0, threading.Event()

    def used(self) -> float:
        try:
            out = subprocess.run([self.exe, "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            return 0.0  # no figure rather than no table

    def __enter__(self):
        if self.exe:
            self.base = self.used()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.used() - self.base)

    def __exit__(self, *exc):
        self._stop.set()


def run_all(args) -> list[dict]:
    deadline = time.monotonic() + args.budget_s
    work = Path(args.work or tempfile.mkdtemp(prefix="cuda-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fn in PATHS.items():
        if args.only and name.split()[0] not in args.only.split(","):
            continue
        check = Check("cpu" if args.rehearse_on_cpu else "cuda", work, deadline,
                      args.phi3_layers, args.smollm2)
        began = time.monotonic()
        with SmiPoll() if not check.rehearsal else _Nothing() as smi:
            try:
                fn(check)
                result = "pass"
            except Blocked as exc:
                result, check.notes = "blocked", [*check.notes, str(exc)]
            except Failed as exc:
                result, check.notes = "FAIL", [*check.notes, str(exc)]
            except Exception as exc:  # a bug in this script or a library: still one row
                result, check.notes = "FAIL", [*check.notes, f"{type(exc).__name__}: {exc}"[:200]]
        check.peak.smi_mb = getattr(smi, "peak", 0.0)
        rows.append({"path": name, "result": result, "seconds": round(time.monotonic() - began, 1),
                     "torch_peak_mb": round(check.peak.torch_mb), "smi_peak_mb": round(check.peak.smi_mb),
                     "rss_peak_mb": round(check.peak.rss_mb), "notes": "; ".join(check.notes)})
        print(f"[{name}] {result} in {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    return rows


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def table(rows: list[dict], rehearsal: bool) -> str:
    memory = "peak RSS MiB" if rehearsal else "peak GPU MiB (torch / nvidia-smi)"
    lines = [f"| path | result | time s | {memory} | notes |", "|---|---|---|---|---|"]
    for r in rows:
        mem = str(r["rss_peak_mb"]) if rehearsal else f"{r['torch_peak_mb']} / {r['smi_peak_mb']}"
        lines.append(f"| {r['path']} | {r['result']} | {r['seconds']} | {mem} | {r['notes']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rehearse-on-cpu", action="store_true",
                   default=os.environ.get("CUDA_CHECK_REHEARSE") == "1",
                   help="run the same paths with device cpu (small Phi-3-mini shape)")
    p.add_argument("--budget-s", type=float, default=570, help="all paths end within this")
    p.add_argument("--phi3-layers", type=int, default=None,
                   help="decoder layers of the Phi-3-mini shape (32 on CUDA, 1 rehearsing)")
    p.add_argument("--only", help="comma list of path numbers, e.g. 1,2")
    p.add_argument("--smollm2", help="also quantize this (small) SmolLM2 form in path 1")
    p.add_argument("--work", help="working folder (default: a new temporary one)")
    args = p.parse_args(argv)
    if not args.rehearse_on_cpu:
        import torch
        if not torch.cuda.is_available():
            print("cuda_check: no CUDA device (torch.cuda.is_available() is False): nothing run")
            return 0
    if args.phi3_layers is None:
        args.phi3_layers = 1 if args.rehearse_on_cpu else 32
    rows = run_all(args)
    device = "CPU rehearsal" if args.rehearse_on_cpu else _gpu_name()
    print(f"cuda_check on {device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(table(rows, args.rehearse_on_cpu))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cuda_check.json").write_text(json.dumps(rows, indent=1))
    results = {r["result"] for r in rows}
    return 1 if "FAIL" in results else 3 if "blocked" in results else 0


def _gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
