"""Serving a graph that cannot batch (a sliding-window KV cache, see infer/batched.py): each
request gets its own onnxruntime-genai generator (its own KV cache and adapter), and the
scheduler thread advances them in turn, a prompt chunk or one token each."""

from __future__ import annotations

import time

from phitune.errors import first_line

# A prompt is fed this many tokens per turn: long prompts interleave with other answers.
PREFILL_CHUNK = 256


def advance(scheduler, job) -> bool:
    """One step of `job` (a prompt chunk or a token); True when it has ended."""
    try:
        if job.decoding is None:
            job.decoding = scheduler.session.start(job.ids, job.sampling, job.adapter)
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
        scheduler.failures += 1
        job._finish("error", f"generation failed: {type(exc).__name__}: "
                             f"{first_line(exc, 200, '')}")
        return True
    finally:
        time.sleep(0)  # og holds the GIL while it computes: let the event loop run
