"""`bench.py auto-opt`: int4 export peak memory, phitune vs the builder's own int4."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import CACHE, peak_of, phitune_json
from benchmarks.shapes import build_phi3_mini_shaped


def bench_auto_opt(args: argparse.Namespace) -> None:
    """Peak memory of an int4 export: phitune (RTN streamed into the AWQ layout, which the builder
    reads directly) vs the builder's own int4 path on the float checkpoint; fitted per layer and
    extrapolated to Phi-3-mini's 32 layers."""
    work = Path(tempfile.mkdtemp(prefix="phitune-bench-"))
    rows = []
    for layers in args.layers:
        model_dir = build_phi3_mini_shaped(Path(args.cache) / f"phi3-mini-shaped-{layers}l", layers)
        ours = phitune_json("auto-opt", "-m", str(model_dir), "-o", str(work / f"ours-{layers}"), "--force")
        line = (f"{layers:2d} layers  phitune {ours['peak_rss_mb'] / 1024:5.2f} GB {ours['seconds']:6.1f} s"
                f"  (builder child {ours['builder_peak_rss_mb'] / 1024:.2f} GB)")
        if layers > 12:  # the builder's own int4 needs ~0.75 GB per layer: it would not fit in 24 GB
            print(line + "   builder int4 on float: skipped (would exceed this machine's memory)")
            continue
        base_peak, base_s = peak_of([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                     str(model_dir), "-o", str(work / f"builder-{layers}"), "-p", "int4",
                                     "-e", "cpu", "-c", str(work / "cache")])
        rows.append((layers, ours["peak_rss_mb"], ours["seconds"], base_peak, base_s))
        print(line + f"   builder int4 on float {base_peak / 1024:5.2f} GB {base_s:6.1f} s")
    if len(rows) >= 2:
        (l0, o0, _, b0, _), (l1, o1, _, b1, _) = rows[0], rows[-1]
        def at32(y0, y1):
            return (y0 + (y1 - y0) / (l1 - l0) * (32 - l0)) / 1024
        print(f"extrapolated to 32 layers: phitune {at32(o0, o1):.1f} GB (goal ≤ 12)   "
              f"builder int4 {at32(b0, b1):.1f} GB")
    print(f"outputs under {work}")


def register(sub) -> None:
    a = sub.add_parser("auto-opt", help="int4 export peak memory: phitune vs the builder's own int4")
    a.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                   help="Phi-3-mini-shaped layer counts to measure (two or more: extrapolated to 32)")
    a.add_argument("--cache", default=str(CACHE))
    a.set_defaults(func=bench_auto_opt)
