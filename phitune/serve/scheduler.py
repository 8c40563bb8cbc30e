"""One thread that owns every generation: requests decode side by side, a token each in turn.

Why not a batch: onnxruntime-genai 0.18 batches only through `og.Engine`, whose requests take
no adapter (the adapter API exists on `og.Generator` alone), and whose static scheduler (the one
a model without a paged KV cache gets) makes a request that arrives mid-batch wait until the
whole batch ends. So each request gets its own generator (its own KV cache and adapter: tokens
never mix) and the thread round-robins over the active ones: a prompt chunk or one token per
turn, so a long prompt or a long answer cannot starve the others. Figures in BENCHMARKS.md (serve).

onnxruntime-genai holds the GIL while it computes, so after each step the thread yields it
(time.sleep(0)) to let the HTTP event loop accept, stream and notice disconnects.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from phitune.errors import first_line
from phitune.infer.session import Decoding, Sampling, Session


class QueueFull(Exception):
    """More requests waiting than --max_queue allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new request."""


# A prompt is fed this many tokens per turn: long prompts interleave with other answers.
PREFILL_CHUNK = 256


@dataclass
class Job:
    """One request's generation. The scheduler thread writes it; the request's event loop
    reads `events`: ("text", str) pieces, then one ("done", None) or ("error", message)."""

    ids: list[int]
    sampling: Sampling
    adapter: str | None
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoding: Decoding | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft_s: float | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _held: str = ""  # text not sent yet: it may be the start of a stop string

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def _text(self, piece: str) -> bool:
        """Send `piece`, holding back a tail that may begin a stop string; True when a stop
        string has appeared (the text before it is sent, the stop string is not)."""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            if min(hits):
                self._emit("text", text[:min(hits)])
            return True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        if len(text) > keep:
            self._emit("text", text[:len(text) - keep])
        return False

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.decoding is not None:
            self.completion_tokens = self.decoding.tokens
            self.decoding = None  # frees the generator and its KV cache now
        self.finish_reason = reason
        if error is None and self._held and reason != "stop":
            self._emit("text", self._held)
        self._held = ""
        self._emit("error", error) if error is not None else self._emit("done", None)


class Scheduler:
    """Admits up to `parallel` jobs to decode at once; up to `max_queue` more wait."""

    def __init__(self, session: Session, parallel: int = 4, max_queue: int = 16):
        self.session = session
        self.parallel = parallel
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="phitune-scheduler", daemon=True)
        self.failures = 0  # jobs that ended in an unexpected error (a bug, not bad input)
        self.cut = 0  # jobs cancelled by close() at its timeout

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise ShuttingDown()
            if len(self._active) >= self.parallel and len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._lock.notify()

    def load(self) -> dict:
        with self._lock:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def close(self, timeout: float) -> bool:
        """Take no new job; let the running ones finish for up to `timeout` seconds, then
        cancel what is left. True when everything finished in time. Safe to call twice."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if threading.current_thread() is self._thread:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pending():
            time.sleep(0.05)
        finished = not self.pending()
        with self._lock:
            for job in self._active + list(self._waiting):
                if not job.cancelled.is_set():
                    self.cut += 1
                job.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        return finished

    def pending(self) -> int:
        with self._lock:
            return len(self._active) + len(self._waiting)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._active and not self._waiting and not self._closing:
                    self._lock.wait()
                while self._waiting and len(self._active) < self.parallel:
                    self._active.append(self._waiting.popleft())
                for job in [j for j in self._waiting if j.cancelled.is_set()]:
                    self._waiting.remove(job)  # gone before its turn: no generator made
                    job._finish("cancelled")
                if self._closing and not self._active and not self._waiting:
                    return
                turn = list(self._active)
            for job in turn:
                if self._advance(job):
                    with self._lock:
                        self._active.remove(job)
                time.sleep(0)  # hand the GIL to the event loop between steps

    def _advance(self, job: Job) -> bool:
        """One step of `job` (a prompt chunk or a token); True when it has ended."""
        if job.cancelled.is_set():
            job._finish("cancelled")
            return True
        try:
            if job.decoding is None:
                job.decoding = self.session.start(job.ids, job.sampling, job.adapter)
            decoding = job.decoding
            if not decoding.prefilled:
                decoding.prefill(PREFILL_CHUNK)
                return False
            piece = decoding.step()
            job.completion_tokens = decoding.tokens  # live, for the log line of a dropped client
            if job.ttft_s is None:
                job.ttft_s = time.perf_counter() - job.submitted
            if piece and job._text(piece):
                job._finish("stop")
                return True
            if decoding.done:
                job._finish("stop" if decoding.eos else "length")
                return True
            return False
        except Exception as exc:  # noqa: BLE001 — one request fails, the server lives on
            self.failures += 1
            job._finish("error", f"generation failed: {type(exc).__name__}: "
                                 f"{first_line(exc, 200, '')}")
            return True
