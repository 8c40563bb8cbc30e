"""The harness every benchmark shares: phitune steps as subprocesses with their --json summary,
peak memory of a command, fresh spawned children, and interleaved timing rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BENCH = REPO / "scripts" / "bench.py"
CACHE = REPO / "models" / "bench"  # bench models and exports, kept between runs


def phitune_json(*args: str) -> dict:
    """Run one phitune step in its own process; its --json summary."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "phitune", "--json", *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"phitune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB of `cmd` and its children, seconds), measured from a wrapper process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
               ".returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "time.perf_counter() - t, rc)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True).stdout
    peak, seconds, rc = out.split()
    if rc != "0":
        sys.exit(f"failed: {' '.join(cmd)}")
    return float(peak), float(seconds)


def as_phitune_infer(fn):
    """Mark `fn` to run, in its spawned child, in the environment `phitune infer` decodes in:
    the CLI re-executes itself with glibc's huge-page tunable (phitune/hugepages.py)."""
    fn.child_environ = True
    return fn


@contextmanager
def child_environ(fn):
    """os.environ as `fn`'s spawned child should inherit it, for the duration of the spawn."""
    from phitune import hugepages
    env = hugepages.system_environ() if getattr(fn, "child_environ", False) else None
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process: no thread pool of one runtime spins beside another's."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with child_environ(fn):
            future = pool.submit(fn, *args)  # the child starts here, with this environment
        return future.result()


def median(values: list[float]) -> float:
    import statistics
    return statistics.median(values)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_jiffies() -> tuple[list[int], float, float]:
    """/proc/stat's cpu line, this process tree's CPU seconds, and the wall clock, now."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return ticks, t.user + t.system + t.children_user + t.children_system, time.perf_counter()


def other_cpu(since: tuple[list[int], float, float]) -> dict:
    """Cores kept busy by processes other than this bench (and its children) since `since`."""
    (t0, own0, w0), (t1, own1, w1) = since, cpu_jiffies()
    hz, d = os.sysconf("SC_CLK_TCK"), [b - a for a, b in zip(t0, t1)]
    busy = (sum(d[:8]) - d[3] - d[4]) / hz  # all but idle and iowait (guest time is inside user)
    steal = d[7] / hz if len(d) > 7 else 0.0
    return {"other": max(busy - steal - (own1 - own0), 0.0) / (w1 - w0), "steal": steal / (w1 - w0)}


_RUNNER: dict = {}


def _runner_load(factory, args) -> None:
    _RUNNER["variants"], _RUNNER["info"] = factory(*args)


def _runner_info() -> tuple[list[str], dict]:
    return list(_RUNNER["variants"]), _RUNNER["info"]


def _runner_once(variant: str) -> tuple[float, float, float, float]:
    """(TTFT s, decode tok/s, CPU seconds, wall seconds) of one generation."""
    cpu, wall = time.process_time(), time.perf_counter()
    ttft, rate = _RUNNER["variants"][variant]()
    return ttft, rate, time.process_time() - cpu, time.perf_counter() - wall


class Runner:
    """A model loaded once in its own spawned process (no runtime's thread pool beside
    another's), generating on demand, in each of its variants."""

    def __init__(self, factory, *args):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_runner_load, initargs=(factory, args))
        with child_environ(factory):
            started = self.pool.submit(_runner_info)  # the child starts here
        self.variants, self.info = started.result()

    def once(self, variant: str) -> tuple[float, float, float, float]:
        return self.pool.submit(_runner_once, variant).result()

    def close(self) -> None:
        self.pool.shutdown()


def measure(configs: dict, runs: int, together: bool, probe: tuple | None = None) -> dict:
    """label + variant → {ttft_s, tok_per_s (medians over `runs` after a warm-up), cores, info,
    and with `probe` (a Runner config) bandwidth_GBps: the median probe reading of its rounds}.

    `together`: every model loaded at once and the runs interleaved round by round (order
    rotated), so a machine whose speed drifts — shared cores, a busy host — biases no config;
    otherwise one model at a time (less memory). The variants of one model (adapter on/off)
    always share its process, so their ratio is free of process-to-process spread."""
    samples: dict = {}
    infos = {}
    groups = [list(configs)] if together else [[label] for label in configs]
    probe_label = "\0probe"  # joins every group's rounds; not a row of the result
    for group in groups:
        runners = {label: Runner(*configs[label]) for label in group}
        if probe:
            runners[probe_label] = Runner(*probe)
        jobs = [(label, v) for label, r in runners.items() for v in r.variants]
        for label, v in jobs:
            samples[label + v], infos[label + v] = [], runners[label].info
        for round_ in range(runs + 1):
            shift = round_ % len(jobs)
            for label, variant in jobs[shift:] + jobs[:shift]:
                time.sleep(0.5)  # the last run's spinning OpenMP / onnxruntime threads go idle
                sample = runners[label].once(variant)
                if round_:  # round 0 warms up
                    samples[label + variant].append(sample)
        for r in runners.values():
            r.close()
        if probe:
            bandwidth = median([got[1] for got in samples.pop(probe_label)])
            for label, v in jobs:
                if label != probe_label:
                    infos[label + v] = {**infos[label + v], "bandwidth_GBps": bandwidth}
    return {label: {"ttft_s": median([s[0] for s in got]), "tok_per_s": median([s[1] for s in got]),
                    "cores": sum(s[2] for s in got) / sum(s[3] for s in got), **infos[label]}
            for label, got in samples.items()}
