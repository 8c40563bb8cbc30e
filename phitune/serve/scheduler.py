"""One thread that owns every generation: the requests decoding at once form one batch, each
row with its own adapter or none, and every decode step computes a token for all of them.

The batch is continuous: a request admitted while others decode prefills apart from the batch
(short prompts that arrive together in one run, a long one a chunk per turn, so it cannot
stall the others for long), then joins the batch at the next step; a row that ends (end of
sequence, max_tokens, a stop string, a client gone) leaves at once. So a request that
arrives mid-batch waits at most one decode step plus its own prefill, whatever the others'
lengths. `infer/batched.py` runs the graph with a LoRA adapter per row; greedy tokens are the
ones each request gets alone (tests/test_batched.py).

onnxruntime releases the GIL while it computes; between steps the thread still yields
(time.sleep(0)) so the HTTP event loop can accept, stream and notice disconnects.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from phitune import ui
from phitune.errors import first_line
from phitune.infer.batched import Batch, BatchModel, Row, Unbatchable, next_token
from phitune.infer.session import Sampling, Session
from phitune.serve import alone


class QueueFull(Exception):
    """More requests waiting than --max_queue allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new request."""


# A prefill run computes at most this many positions, padding included: a long prompt is fed
# this many tokens per turn (it interleaves with other answers), short ones share a run.
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
    row: Row | None = None  # made when the scheduler admits the job
    decoding: object = None  # its own og generator, on a graph that cannot batch (alone.py)
    stream: object = None  # the tokenizer's incremental decoder for this answer
    rng: object = None  # its sampling generator, seeded by the request's seed
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
        # the graph with a LoRA input per row; og's copy of the weights loads only for a graph
        # that cannot batch (server.py opens the session with its tokenizer alone)
        try:
            self.model = BatchModel(session.model_dir, session.adapter_files)
            self.batch = Batch(self.model)
        except Unbatchable as exc:  # a generator per request, a token each in turn (alone.py)
            ui.debug(f"no batching for {session.model_dir}: {exc}")
            self.model = self.batch = None
            session.load_weights()
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
        deferred = False  # the last turn left out the step
        while True:
            with self._lock:
                while not self._active and not self._waiting and not self._closing:
                    self._lock.wait()
                while self._waiting and len(self._active) < self.parallel:
                    self._active.append(self._waiting.popleft())
                for job in [j for j in self._waiting if j.cancelled.is_set()]:
                    self._waiting.remove(job)  # gone before its turn: nothing was computed
                    job._finish("cancelled")
                if self._closing and not self._active and not self._waiting:
                    return
                turn = list(self._active)
            gone = [job for job in turn if job.cancelled.is_set()]
            for job in gone:
                job._finish("cancelled")
            self._end(gone)  # before the step: no token is computed for a client gone
            if self.model is None:
                self._end([job for job in turn if job not in gone and alone.advance(self, job)])
                continue
            live = [job for job in turn if job not in gone]
            ended = self._prefill(live)
            self._end(ended)
            # a request that came in meanwhile prefills before the step (its first token
            # waits for no step), once in a row: the batch steps at least every other turn
            deferred = not deferred and self._arrived()
            if deferred:
                continue
            time.sleep(0)
            self._end(self._step([job for job in live if job not in ended]))
            time.sleep(0)  # hand the GIL to the event loop between steps

    def _arrived(self) -> bool:
        """Whether a waiting request can be admitted now."""
        with self._lock:
            return bool(self._waiting) and len(self._active) < self.parallel and not self._closing

    def _end(self, jobs: list[Job]) -> None:
        """Take ended jobs out of the batch (their KV rows freed) and off the active list."""
        if not jobs:
            return
        if self.batch is not None:
            self.batch.drop([job.row for job in jobs if job.row is not None])
        with self._lock:
            for job in jobs:
                job.row = None
                self._active.remove(job)

    def _prefill(self, jobs: list[Job]) -> list[Job]:
        """One turn's prompt work for the jobs not in the batch yet; the jobs that ended.

        Fresh prompts of up to PREFILL_CHUNK tokens run together, shortest first, as many
        to a run as fit PREFILL_CHUNK positions with the padding (requests that arrive at
        once then share one run instead of each waiting for the ones before it: the TTFT
        at several clients); a longer prompt feeds one chunk alone. A job whose prompt is in
        gets its first token and joins the batch."""
        waiting = [job for job in jobs if job.row is None or not job.row.prefilled]
        for job in waiting:
            if job.row is None:
                job.row = Row(list(job.ids), job.adapter)
                job.stream = self.session.tokenizer.create_stream()
                job.rng = np.random.default_rng(job.sampling.seed if job.sampling.seed
                                                is not None else random.getrandbits(64))
        fresh = sorted((job for job in waiting if job.row.fed == 0
                        and len(job.row.prompt) <= PREFILL_CHUNK), key=lambda j: len(j.row.prompt))
        runs = _runs(fresh) + [[job] for job in waiting if job not in fresh]
        ended = []
        for run in runs:
            try:
                if len(run) > 1:
                    firsts = self.model.prefill_together([job.row for job in run])
                else:
                    firsts = [self.model.prefill(run[0].row, PREFILL_CHUNK)]
            except Exception as exc:  # noqa: BLE001 — these requests fail, the server lives on
                self._fail(run, exc)
                ended += run
                continue
            ended += [job for job, logits in zip(run, firsts)
                      if logits is not None and self._first(job, logits)]
            time.sleep(0)
        return ended

    def _first(self, job: Job, logits) -> bool:
        """A prefilled job's first token, then its place in the batch; True when it ended."""
        try:
            if self._token(job, logits):
                return True
            self.batch.join(job.row)
            return False
        except Exception as exc:  # noqa: BLE001 — one request fails, the server lives on
            return self._fail([job], exc)

    def _step(self, jobs: list[Job]) -> list[Job]:
        """One decode step of the batch; the jobs that ended with it."""
        by_row = {id(job.row): job for job in jobs if job.row is not None}
        in_batch = [by_row[id(row)] for row in self.batch.rows if id(row) in by_row]
        if not in_batch:
            return []
        try:
            logits = self.batch.step()
        except Exception as exc:  # noqa: BLE001 — the batch's requests fail, the server lives on
            self._fail(in_batch, exc)
            return in_batch
        return [job for job, row_logits in zip(in_batch, logits) if self._token(job, row_logits)]

    def _token(self, job: Job, logits) -> bool:
        """Choose `job`'s next token from its logits and send its text; True when it ended
        (end of sequence, a stop string, max_tokens or the context length)."""
        row = job.row
        token = next_token(logits, job.sampling, job.rng)
        row.new.append(token)
        eos = token in self.session.eos_ids
        job.completion_tokens = len(row.new) - (1 if eos else 0)  # live, for a dropped client's log
        if job.ttft_s is None:
            job.ttft_s = time.perf_counter() - job.submitted
        if eos:
            job._finish("stop")
            return True
        piece = job.stream.decode(token)
        if piece and job._text(piece):
            job._finish("stop")
            return True
        if (len(row.new) >= job.sampling.max_new_tokens
                or len(row.prompt) + len(row.new) >= self.session.context_length):
            job._finish("length")
            return True
        return False

    def _fail(self, jobs: list[Job], exc: Exception) -> bool:
        self.failures += len(jobs)
        for job in jobs:
            job._finish("error", f"generation failed: {type(exc).__name__}: "
                                 f"{first_line(exc, 200, '')}")
        return True


def _runs(fresh: list[Job]) -> list[list[Job]]:
    """Prompts sorted by length, cut into runs of at most PREFILL_CHUNK padded positions."""
    runs: list[list[Job]] = []
    for job in fresh:
        if runs and (len(runs[-1]) + 1) * len(job.row.prompt) <= PREFILL_CHUNK:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs
