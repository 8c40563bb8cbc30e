"""The five CUDA paths of scripts/cuda_check.py, one function each (issue 32).

Each runs `phitune` commands in child processes (its CLI, as a user runs it) and raises Failed
(a check did not hold, or a command failed) or Blocked (something the path needs is not
installed there, e.g. a wheel too large to carry). `Check` holds the device, the working
folder, the shared deadline, and the peak memory its children reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # phitune (this tree) and benchmarks.shapes
DATA = ["--data_files", str(REPO / "data" / "travel.jsonl"), "--data_name", "json",
        "--text_template", r"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"]
PROMPT = "what is the best thing to see in chicago"
PPL_TOLERANCE = 0.01  # relative gap between the device's and the CPU's AWQ perplexity
LAB_PHI3_MINI_S = 8 * 60  # the lab's published AWQ time for Phi-3-mini on an A100

# Runs phitune's CLI in a child and leaves its peak memory in $CUDA_CHECK_PEAK at exit.
CHILD = r"""
import atexit, json, os, resource, runpy, sys
def _peak():
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(os.environ["CUDA_CHECK_PEAK"], "w") as f:
        json.dump(out, f)
atexit.register(_peak)
sys.argv = ["phitune", *sys.argv[1:]]
runpy.run_module("phitune", run_name="__main__", alter_sys=True)
"""


class Failed(Exception):
    """A check of the path did not hold (or a command failed)."""


class Blocked(Exception):
    """The path cannot run here: something it needs is missing (not a phitune failure)."""


@dataclass
class Peak:
    torch_mb: float = 0.0
    smi_mb: float = 0.0
    rss_mb: float = 0.0


@dataclass
class Check:
    device: str                      # "cuda", or "cpu" in a rehearsal
    work: Path
    deadline: float                  # time.monotonic() by which everything must end
    phi3_layers: int
    smollm2: str | None = None       # a small SmolLM2 form (scripts/cuda_wheels.sh says why)
    peak: Peak = field(default_factory=Peak)
    notes: list = field(default_factory=list)

    @property
    def rehearsal(self) -> bool:
        return self.device == "cpu"

    def phitune(self, *args: str, timeout: float | None = None, json_out: bool = True) -> dict | str:
        """One `phitune` command; its JSON summary (or its stdout). Raises Failed on a non-zero
        exit with the command's last stderr line, Blocked when a library is missing."""
        left = self.deadline - time.monotonic()
        if left < 5:
            raise Failed("no time left in the budget")
        peak_file = Path(tempfile.mkstemp(prefix="peak-", dir=self.work)[1])
        env = {**os.environ, "CUDA_CHECK_PEAK": str(peak_file), "HF_HUB_OFFLINE": "1",
               "PHITUNE_CACHE": str(self.work / "cache"), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-c", CHILD, *(["--json"] if json_out else []), *args]
        log = self.work / "commands.log"
        with open(log, "a") as f:
            f.write("$ phitune " + " ".join(cmd[3:]) + "\n")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                                  timeout=min(timeout or left, left))
        except subprocess.TimeoutExpired:
            raise Failed(f"`phitune {args[0]}` ran past {min(timeout or left, left):.0f} s") from None
        with open(log, "a") as f:
            f.write(done.stderr[-4000:] + "\n")
        self._add_peak(peak_file)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit {done.returncode}"
            if "No module named" in done.stderr or "needs bitsandbytes" in done.stderr:
                raise Blocked(last.strip()[:160])
            raise Failed(f"`phitune {args[0]}` exit {done.returncode}: {last.strip()[:160]}")
        return json.loads(done.stdout) if json_out else done.stdout.strip()

    def _add_peak(self, peak_file: Path) -> None:
        try:
            peak = json.loads(peak_file.read_text() or "{}")
        except (OSError, ValueError):
            peak = {}
        peak_file.unlink(missing_ok=True)
        self.peak.torch_mb = max(self.peak.torch_mb, peak.get("torch_peak_mb", 0.0))
        self.peak.rss_mb = max(self.peak.rss_mb, peak.get("rss_mb", 0.0),
                               peak.get("children_rss_mb", 0.0))


def _rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-9)


def quantize_awq(c: Check, model: str = "tiny-phi3", name: str = "tiny") -> dict:
    """1. AWQ on the device; perplexity within 1% of the CPU run's (same seed, same data)."""
    out = c.phitune("quantize", "-m", model, "--algorithm", "awq", "--device", c.device,
                    "-o", str(c.work / f"awq-{name}-{c.device}"), "--force")
    if out.get("device") != c.device:
        raise Failed(f"ran on {out.get('device')}, not {c.device}")
    ref = out if c.rehearsal else c.phitune(
        "quantize", "-m", model, "--algorithm", "awq", "--device", "cpu",
        "-o", str(c.work / f"awq-{name}-cpu"), "--force")
    gap = _rel_gap(out["ppl_after"], ref["ppl_after"])
    c.notes.append(f"{name} ppl {out['ppl_after']:.3f} vs CPU {ref['ppl_after']:.3f} "
                   f"({gap:.2%}), {out['seconds']:.0f} s")
    if gap > PPL_TOLERANCE:
        raise Failed(f"AWQ perplexity off the CPU's by {gap:.2%} (> {PPL_TOLERANCE:.0%})")
    return out


def path_quantize(c: Check) -> None:
    quantize_awq(c)
    if c.smollm2:
        quantize_awq(c, c.smollm2, "smollm2")


def _adapter_shapes(ft_dir: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(ft_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _finetune(c: Check, base: Path, device: str, dtype: str, method: str = "lora",
              steps: int = 20) -> tuple[dict, Path]:
    out_dir = c.work / f"ft-{method}-{device}"
    out = c.phitune("finetune", "--method", method, "-m", str(base), *DATA,
                    "--max_steps", str(steps), "--lora_r", "16", "--dtype", dtype,
                    "--no-compile", "--device", device, "-o", str(out_dir), "--force")
    return out, out_dir


def _loss_falls(c: Check, out: dict, what: str) -> None:
    first, last = out["train_loss_first"], out["train_loss_last"]
    c.notes.append(f"{what} loss {first:.3f} → {last:.3f} ({out.get('dtype')}, "
                   f"{out.get('tokens_per_s')} tok/s)")
    if not last < first:
        raise Failed(f"{what}: training loss did not fall ({first:.4f} → {last:.4f})")


def path_lora(c: Check) -> None:
    """2. LoRA on the AWQ base on the device, bf16, compile off: the loss falls and the adapter
    has the CPU adapter's tensors and shapes."""
    base = c.work / f"awq-tiny-{c.device}"
    if not (base / "config.json").is_file():
        quantize_awq(c)
    out, ft = _finetune(c, base, c.device, "bfloat16")
    if out.get("device") != c.device or out.get("dtype") != "bfloat16":
        raise Failed(f"trained on {out.get('device')} in {out.get('dtype')}, not {c.device} bf16")
    _loss_falls(c, out, "lora")
    ref = ft if c.rehearsal else _finetune(c, base, "cpu", "float32", steps=2)[1]
    mine, theirs = _adapter_shapes(ft), _adapter_shapes(ref)
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:2]
        raise Failed(f"adapter differs from the CPU one in {len(diff)}+ tensors, e.g. {diff}")
    c.notes.append(f"adapter: {len(mine)} tensors, shapes equal to the CPU adapter's")


def path_qlora(c: Check) -> None:
    """3. QLoRA (bitsandbytes nf4) on the device: the loss falls."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Blocked("bitsandbytes is not installed (scripts/cuda_wheels.sh)") from None
    out, _ = _finetune(c, Path(REPO / "data" / "tiny-phi3"), c.device, "bfloat16", "qlora", 10)
    _loss_falls(c, out, "qlora")


def _answer(c: Check, model_dir: Path, *extra: str) -> str:
    return c.phitune("infer", "-m", str(model_dir), "--prompt", PROMPT, "--max_new_tokens", "16",
                     *extra, json_out=False)


def _cuda_runtime() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _built_for_cuda(c: Check, out_dir: Path, *flags: str, adapter: bool = True) -> Path:
    """auto-opt for CUDA (the builder writes the graph on any machine; only running it needs
    a GPU): genai_config names cuda, and the adapter auto-opt wrote fits the graph's LoRA
    inputs (element type: the CUDA graph computes in fp16)."""
    ft = c.work / f"ft-lora-{c.device}"
    base = c.work / f"awq-tiny-{c.device}"  # what ft/model links to (that would bring adapter/)
    built = c.phitune("auto-opt", "-m", str(ft if adapter else base), "--device", "gpu",
                      "--provider", "CUDAExecutionProvider", *flags, "-o", str(out_dir), "--force")
    model = out_dir / "model"
    config = json.loads((model / "genai_config.json").read_text())
    providers = [next(iter(p)) for p in config["model"]["decoder"]["session_options"]
                 .get("provider_options", [])]
    if "cuda" not in providers:
        raise Failed(f"the CUDA build's genai_config names providers {providers}, not cuda")
    what = f"{' '.join(flags) or 'int4'} CUDA build {built.get('seconds', 0):.0f} s"
    if adapter:
        from phitune.infer.adapters import check_fits, graph_inputs
        try:
            check_fits(model, model / "adapter_weights.onnx_adapter")
        except Exception as exc:
            raise Failed(f"the CUDA build's adapter does not fit its graph: {exc}") from None
        lora = {dtype for name, (dtype, _) in graph_inputs(model).items() if "lora" in name}
        what += f", LoRA inputs {'/'.join(sorted(lora))}, adapter fits"
    c.notes.append(what)
    return model


def _cpu_build(c: Check, out_dir: Path, *flags: str) -> Path:
    c.phitune("auto-opt", "-m", str(c.work / f"ft-lora-{c.device}"), "--device", "cpu", *flags,
              "-o", str(out_dir), "--force")
    return out_dir / "model"


def path_onnx(c: Check) -> None:
    """4. auto-opt for CUDA (the builder's CUDA graph: int4, and fp16 with the adapter; fp32
    only without adapters, see auto-opt's refusal) and infer on it with and without the
    adapter; the fp32 CUDA base answers as the fp32 CPU base does (greedy). Rehearsing, the
    CUDA graphs are built and checked, and infer runs on CPU builds instead."""
    if not (c.work / f"ft-lora-{c.device}" / "adapter").is_dir():
        path_lora(c)
    int4 = _built_for_cuda(c, c.work / "onnx-int4-gpu")
    fp16 = _built_for_cuda(c, c.work / "onnx-fp16-gpu", "--precision", "fp16")
    fp32 = _built_for_cuda(c, c.work / "onnx-fp32-gpu", "--precision", "fp32", "--no-multi_lora",
                           adapter=False)
    if not c.rehearsal and not _cuda_runtime():
        raise Blocked("infer on CUDA needs onnxruntime-gpu (a 244 MiB wheel, not carried)")
    cpu32 = _cpu_build(c, c.work / "onnx-fp32-cpu", "--precision", "fp32")
    if c.rehearsal:  # the same answers, from CPU builds
        int4, fp16, fp32 = _cpu_build(c, c.work / "onnx-int4-cpu"), cpu32, cpu32
    with_adapter, without = _answer(c, int4), _answer(c, int4, "--no-adapter")
    if not with_adapter or not without:
        raise Failed("infer gave an empty answer")
    base, base_cpu = _answer(c, fp32), _answer(c, cpu32, "--no-adapter")
    if base != base_cpu:
        raise Failed(f"fp32 greedy answers differ, CUDA {base!r} vs CPU {base_cpu!r}")
    tuned, tuned_cpu = _answer(c, fp16), _answer(c, cpu32)
    same = "changes" if with_adapter != without else "does not change"
    c.notes.append(("rehearsal, infer on CPU builds: " if c.rehearsal else "")
                   + f"base fp32 greedy answer equal on CUDA and CPU; with the adapter fp16 CUDA "
                   f"{'equals' if tuned == tuned_cpu else 'differs from'} fp32 CPU; the adapter "
                   f"{same} the int4 answer")


def _phi3_mini_awq(c: Check, layers: int) -> dict:
    from benchmarks.shapes import build_phi3_mini_shaped
    path = c.work / f"phi3-mini-{layers}l"
    began = time.monotonic()
    build_phi3_mini_shaped(path, layers, device=c.device)  # random bf16 weights, drawn there
    built = time.monotonic() - began
    if c.device == "cuda":
        import torch
        torch.cuda.empty_cache()
    out = c.phitune("quantize", "-m", str(path), "--algorithm", "awq", "--no-eval",
                    "--device", c.device, "-o", str(c.work / f"awq-phi3-mini-{layers}l"), "--force")
    shutil.rmtree(path, ignore_errors=True)  # 7.6 GB at 32 layers
    return {**out, "built_s": built, "per_layer_s": out["seconds"] / layers}


def path_phi3_mini(c: Check) -> None:
    """5. A Phi-3-mini-shaped AWQ quantize (random bf16 weights; 32 layers on CUDA): time and
    peak memory against the lab's ~8 minutes on an A100. A 2-layer run first gives the rate;
    the full run goes ahead only if the budget left holds it, else its time is extrapolated."""
    probe_layers = min(2, c.phi3_layers)
    probe = _phi3_mini_awq(c, probe_layers)
    rate = probe["per_layer_s"]
    c.notes.append(f"{probe_layers} layers: {probe['seconds']:.0f} s ({rate:.1f} s/layer, "
                   f"{probe.get('compute_dtype')}, model drawn in {probe['built_s']:.0f} s)")
    left = c.deadline - time.monotonic()
    if c.phi3_layers > probe_layers and left > 1.5 * rate * c.phi3_layers + 90:
        full = _phi3_mini_awq(c, c.phi3_layers)
        c.notes.append(f"{c.phi3_layers} layers: {full['seconds']:.0f} s "
                       f"({full['per_layer_s']:.1f} s/layer; lab: ~{LAB_PHI3_MINI_S} s on an A100)")
    elif c.phi3_layers > probe_layers:
        c.notes.append(f"{c.phi3_layers} layers not run ({left:.0f} s of budget left): "
                       f"~{rate * c.phi3_layers:.0f} s at the probe's rate (lab: "
                       f"~{LAB_PHI3_MINI_S} s on an A100)")


PATHS = {"1 quantize awq": path_quantize, "2 finetune lora": path_lora,
         "3 finetune qlora": path_qlora, "4 auto-opt + infer": path_onnx,
         "5 phi3-mini awq": path_phi3_mini}
