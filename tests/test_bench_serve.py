"""`scripts/bench.py serve`'s clients: each a thread sending its requests one after another,
all starting at once (lockstep) or client i of N i/N of a request's latency later (staggered)."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench():
    """scripts/benchmarks/serve.py, imported as bench.py imports it."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module("benchmarks.serve")


def test_client_starts():
    bench = _bench()
    assert bench.client_starts(4, "lockstep", 2.0) == [0.0] * 4
    assert bench.client_starts(4, "staggered", 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert bench.client_starts(1, "staggered", 2.0) == [0.0]


@pytest.mark.parametrize("arrivals", ["lockstep", "staggered"])
def test_each_client_sends_its_own_requests_in_turn_from_its_start(monkeypatch, arrivals):
    bench = _bench()
    sent = []  # (client thread, model, question, start, end)
    lock = threading.Lock()

    def fake_request(port, body, disconnect_after=0, timeout=300):
        start = time.perf_counter()
        time.sleep(0.02)
        with lock:
            sent.append((threading.current_thread().name, body["model"],
                         body["messages"][0]["content"], start, time.perf_counter()))
        return {"status": 200, "ttft_s": 0.01, "tokens": 8, "latency_s": 0.02}
    monkeypatch.setattr(bench, "serve_request", fake_request)
    models = ["base", "alpha", "beta"]
    starts = bench.client_starts(4, arrivals, 0.2)
    t0 = time.perf_counter()
    row = bench.serve_load(0, models, 4, 12, 8, time.monotonic() + 60, starts)
    assert row["requests"] == 12 and row["failed"] == 0 and row["tokens_per_request"] == 8
    # the same mix as request indices 0..11 rotating over the models and questions
    assert sorted(m for _, m, *_ in sent) == sorted(models[i % 3] for i in range(12))
    for c in range(4):
        mine = sorted((s for s in sent if s[0] == f"client-{c}"), key=lambda s: s[3])
        assert len(mine) == 3
        assert [m for _, m, *_ in mine] == [models[i % 3] for i in range(c, 12, 4)]
        assert all(a[4] <= b[3] for a, b in zip(mine, mine[1:]))  # one after another
        assert mine[0][3] - t0 >= starts[c] - 0.005
