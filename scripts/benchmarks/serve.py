"""`bench.py serve`: phitune serve on loopback at 1-8 clients mixing adapters and the base, the
clients arriving at once (lockstep) and spread out (staggered), og.Engine's batching for
reference, and a soak with bad payloads and dropped streams."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import CACHE, as_phitune_infer, in_child, phitune_json
from benchmarks.shapes import build_phi3_mini_shaped, random_lora

SERVE_QUESTIONS = ["Plan a day in Lisbon.", "What should I pack for Iceland in March?",
                   "Where can I eat well in Chicago?", "How do I get from Rome to Florence?"]


def _serve_rss_mb(pid: int) -> float:
    from phitune.measure import _proc_kib
    return (_proc_kib(f"/proc/{pid}/status", "VmRSS") or 0) / 1024


def serve_request(port: int, body: dict | bytes, disconnect_after: int = 0,
                  timeout: float = 300) -> dict:
    """One request over a raw loopback connection: status, TTFT, latency, completion tokens.
    Streams are read event by event; with `disconnect_after` the socket is closed after that
    many events (a client that goes away mid-answer)."""
    import http.client
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        path = "/v1/chat/completions" if isinstance(body, bytes) or "messages" in body \
            else "/v1/completions"
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        out = {"status": response.status, "ttft_s": None, "tokens": 0, "events": 0}
        if response.status != 200 or "text/event-stream" not in response.getheader("content-type", ""):
            payload = json.loads(response.read() or b"{}")
            out["tokens"] = payload.get("usage", {}).get("completion_tokens", 0)
            out["ttft_s"] = time.perf_counter() - start if response.status == 200 else None
        else:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                    out["ttft_s"] = out["ttft_s"] or time.perf_counter() - start
                if event.get("usage"):
                    out["tokens"] = event["usage"]["completion_tokens"]
                out["events"] += 1
                if disconnect_after and out["events"] >= disconnect_after:
                    break
        out["latency_s"] = time.perf_counter() - start
        return out
    except OSError as exc:
        return {"status": None, "error": str(exc), "latency_s": time.perf_counter() - start}
    finally:
        conn.close()


def server_ttfts(log: Path, skip: int) -> list[float]:
    """The server's own time to first token (s) of the 200 requests logged after line `skip`:
    the first token, not the first text (a random-weight model's first tokens are often
    parts of a character, so its first streamed text may come several tokens later)."""
    lines = log.read_text().splitlines()[skip:]
    return [float(line.rsplit("ttft_ms=", 1)[1].split()[0]) / 1e3 for line in lines
            if " status=200 " in line and "ttft_ms=" in line]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


ARRIVALS = ("lockstep", "staggered")


def client_starts(clients: int, arrivals: str, solo_s: float) -> list[float]:
    """When each client sends its first request, in seconds after the run starts. lockstep:
    all at once (answers of the same length keep them in phase: every prompt then arrives
    with the others'); staggered: client i at i/clients of one request's solo latency, so
    their requests are spread evenly over a request's time (a request arriving mid-batch
    joins at the next step, so the continuous batch keeps them out of phase)."""
    if arrivals == "lockstep":
        return [0.0] * clients
    return [i * solo_s / clients for i in range(clients)]


def serve_load(port: int, models: list[str], clients: int, requests: int, new_tokens: int,
               deadline: float, starts: list[float] | None = None) -> dict:
    """`requests` streamed chat requests from `clients` clients, rotating over `models`: each
    client a thread of its own, sending its share one after another (the next as soon as its
    answer ends), the first `starts[i]` s after the run starts (all at once by default)."""
    import threading
    starts = starts or [0.0] * clients
    results: list[list[dict]] = [[] for _ in range(clients)]

    def one(i: int) -> dict:
        if time.monotonic() > deadline:
            return {"status": "skipped"}
        return serve_request(port, {
            "model": models[i % len(models)], "temperature": 0, "max_tokens": new_tokens,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]})

    def client(c: int) -> None:
        time.sleep(max(0.0, start + starts[c] - time.perf_counter()))
        for i in range(c, requests, clients):  # round k sends requests k*clients .. +clients-1
            results[c].append(one(i))
    threads = [threading.Thread(target=client, args=(c,), name=f"client-{c}")
               for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    results = [r for mine in results for r in mine]
    done = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in done)
    return {"clients": clients, "requests": len(done), "failed": len(results) - len(done),
            "wall_s": wall, "tok_per_s": tokens / wall, "req_per_s": len(done) / wall,
            "ttft_p50": _pct([r["ttft_s"] for r in done if r["ttft_s"]], 0.5),
            "ttft_p95": _pct([r["ttft_s"] for r in done if r["ttft_s"]], 0.95),
            "lat_p50": _pct([r["latency_s"] for r in done], 0.5),
            "lat_p95": _pct([r["latency_s"] for r in done], 0.95),
            "tokens_per_request": tokens / max(1, len(done))}


SERVE_BAD = [b"{not json", {"messages": []}, {"model": "base", "messages": "hi"},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1},
             {"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]},
             {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}]


def serve_soak(port: int, models: list[str], total: int, clients: int, new_tokens: int,
               deadline: float) -> dict:
    """`total` requests: 10% bad payloads (must be 4xx), 10% streams dropped after the first
    event, the rest ordinary (half streamed); counts every status."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        if time.monotonic() > deadline:
            return "skipped"
        message = [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]
        good = {"model": models[i % len(models)], "messages": message, "max_tokens": new_tokens,
                "temperature": 0}
        if i % 10 == 3:
            r = serve_request(port, SERVE_BAD[i // 10 % len(SERVE_BAD)])
            return "bad→4xx" if r["status"] and 400 <= r["status"] < 500 else f"bad→{r['status']}"
        if i % 10 == 7:
            r = serve_request(port, {**good, "max_tokens": 10 * new_tokens, "stream": True},
                              disconnect_after=1)
            return "disconnected" if r["status"] == 200 else f"disconnect→{r['status']}"
        r = serve_request(port, {**good, "stream": i % 2 == 0})
        return "ok" if r["status"] == 200 else f"ok→{r['status']}"
    with ThreadPoolExecutor(clients) as pool:
        return dict(Counter(pool.map(one, range(total))))


def bench_serve(args: argparse.Namespace) -> None:
    """phitune serve on loopback: throughput and latency at 1, 2, 4, 8 concurrent clients over
    a mix of the base and two adapters, the clients starting at once and staggered (a row
    each), og's own batching (og.Engine, base only) for reference, and a soak with
    disconnects and bad payloads."""
    import signal
    import socket
    cache = Path(args.cache)
    n = args.phi3_mini_layers
    float_dir = build_phi3_mini_shaped(cache / f"phi3-mini-shaped-{n}l", n)
    onnx_dir = cache / f"infer-phi3-mini-shaped-{n}l-int4-b128"
    phitune_json("auto-opt", "-m", str(float_dir), "--block_size", "128", "-o", str(onnx_dir))
    adapters = []
    for name, rank in (("alpha", 16), ("beta", 8)):  # different ranks: different random weights
        lora = random_lora(float_dir, cache / f"serve-phi3-mini-shaped-{n}l-lora-r{rank}", rank)
        file = onnx_dir / "model" / f"serve-{name}.onnx_adapter"
        if not file.is_file():
            phitune_json("export-adapter", "-a", str(lora), "--base", str(onnx_dir), "-o", str(file))
        adapters += ["--adapter", f"{file}={name}"]
    models = ["base", "alpha", "beta"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = cache / "serve-bench.log"
    proc = subprocess.Popen([sys.executable, "-m", "phitune", "serve", "-m", str(onnx_dir),
                             "--model_name", "base", *adapters, "--port", str(port),
                             "--parallel", "8", "--max_queue", "64"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + args.max_minutes * 60
    try:
        while serve_request(port, {"model": "base", "prompt": "hi", "max_tokens": 1}).get("status") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"phitune serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        serve_load(port, models, 3, 3, 8, deadline)  # warm-up: every adapter once
        rss_start = _serve_rss_mb(proc.pid)
        print(f"== serve: Phi-3-mini-shaped {n} layers, int4 block 128, random weights; adapters "
              f"r16 + r8 on every projection; requests rotate base/alpha/beta; greedy, "
              f"{args.new_tokens} new tokens, streamed; server RSS {rss_start:.0f} MB after warm-up")
        modes = list(ARRIVALS) if args.arrivals == "both" else [args.arrivals]
        print("TTFT: to the first streamed text, at the client; server TTFT: to the first "
              "token, from the server's log")
        print("each client sends its requests one after another; arrivals: lockstep = the "
              "clients start at once (same-length answers keep their prompts arriving "
              "together), staggered = client i starts i/N of one request's solo latency later "
              "(the 1-client row's latency p50; staggered tok/s include that ramp)")
        print(f"{'clients':>7} {'arrivals':>9} {'requests':>8} {'tok/s':>7} {'× 1 client':>10} "
              f"{'req/s':>6} {'TTFT p50':>9} {'p95':>6} {'server TTFT p50':>16} {'p95':>6} "
              f"{'latency p50':>12} {'p95':>6}")
        rows = []
        solo_s = None  # one request's latency alone: the stagger's period
        for clients in args.clients:
            for arrivals in (["either"] if clients == 1 else modes):
                if arrivals == "staggered" and solo_s is None:
                    solo_s = serve_load(port, models, 1, 1, args.new_tokens, deadline)["lat_p50"]
                    print(f"(no 1-client row before: one request alone took {solo_s:.2f} s)")
                skip = len(log.read_text().splitlines())
                row = serve_load(port, models, clients, args.requests_per_client * clients,
                                 args.new_tokens, deadline,
                                 client_starts(clients, arrivals, solo_s or 0.0))
                time.sleep(0.5)  # the last request's log line
                server = server_ttfts(log, skip)
                row["server_ttft_p50"], row["server_ttft_p95"] = _pct(server, 0.5), _pct(server, 0.95)
                row["arrivals"] = arrivals
                if clients == 1:
                    solo_s = row["lat_p50"]
                rows.append(row)
                base = next((r for r in rows if r["clients"] == 1), rows[0])
                print(f"{clients:7} {arrivals:>9} {row['requests']:8} {row['tok_per_s']:7.1f} "
                      f"{row['tok_per_s'] / base['tok_per_s']:9.2f}× {row['req_per_s']:6.2f} "
                      f"{row['ttft_p50']:8.2f}s {row['ttft_p95']:5.2f}s "
                      f"{row['server_ttft_p50']:15.2f}s {row['server_ttft_p95']:5.2f}s "
                      f"{row['lat_p50']:11.2f}s "
                      f"{row['lat_p95']:5.2f}s" + (f"  ({row['failed']} failed)" if row["failed"] else ""))
        rss_load = _serve_rss_mb(proc.pid)
        print(f"server RSS {rss_start:.0f} → {rss_load:.0f} MB over the load runs")
        base = next((r for r in rows if r["clients"] == 1), rows[0])
        for arrivals in modes:
            four = next((r for r in rows if r["clients"] == 4 and r["arrivals"] == arrivals), None)
            if four:
                print(f"goal ({arrivals}): 4 clients ≥ 1.8× one client's tok/s → "
                      f"{four['tok_per_s'] / base['tok_per_s']:.2f}×; "
                      f"TTFT p95 ≤ 2× one client's → {four['ttft_p95'] / base['ttft_p95']:.2f}× "
                      f"(server TTFT {four['server_ttft_p95'] / base['server_ttft_p95']:.2f}×)"
                      + (f"; clients {solo_s / 4:.2f} s apart" if arrivals == "staggered" else ""))

        if args.soak:
            rss_soak = _serve_rss_mb(proc.pid)
            start = time.perf_counter()
            counts = serve_soak(port, models, args.soak, 4, args.soak_tokens, deadline)
            rss_end = _serve_rss_mb(proc.pid)
            errors = sum(v for k, v in counts.items() if k not in ("ok", "bad→4xx", "disconnected"))
            alive = proc.poll() is None
            print(f"soak: {args.soak} requests, 4 clients, {args.soak_tokens} new tokens, "
                  f"{time.perf_counter() - start:.0f} s: {counts}; server errors/other {errors}; "
                  f"alive {alive}; RSS at the soak's start {rss_soak:.0f} → {rss_end:.0f} MB "
                  f"({rss_end / rss_soak - 1:+.1%}, goal within ±10%; after warm-up "
                  f"{rss_start:.0f} MB)")
            tracebacks = log.read_text().count("Traceback")
            print(f"server log: {tracebacks} tracebacks; lines: "
                  f"{sum(1 for _ in open(log))} ({log})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
        print(f"SIGTERM → server exit code {code}")
    if args.engine:
        ref = in_child(engine_batching, str(onnx_dir / "model"), args.new_tokens, [1, 2, 4])
        print("og.Engine (onnxruntime-genai's batching: base model only, no per-request adapter "
              "in its 0.18 API):")
        for batch, tok_s in ref.items():
            print(f"  batch {batch}: {tok_s:.1f} tok/s ({tok_s / ref[1]:.2f}× batch 1)")


@as_phitune_infer
def engine_batching(model_dir: str, new_tokens: int, batches: list[int]) -> dict:
    """Decode tok/s of og.Engine serving `batch` greedy requests at once (base model), the same
    questions and chat template as the serve runs."""
    import numpy as np
    import onnxruntime_genai as og
    from phitune.infer.session import _config
    from phitune.sequence_start import of_model_dir
    model = og.Model(_config(og, Path(model_dir)))
    tokenizer = og.Tokenizer(model)
    sequence = of_model_dir(model_dir)  # og's tokenizer adds no BOS; phitune's Session adds it
    out = {}
    for batch in batches:
        engine = og.Engine(model)
        buffer = engine.create_event_buffer(64)
        requests = []
        start = time.perf_counter()
        for i in range(batch):
            messages = [{"role": "user", "content": SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]}]
            ids = sequence.apply(tokenizer.encode(tokenizer.apply_chat_template(
                json.dumps(messages), add_generation_prompt=True)))
            request = engine.create_request()
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(new_tokens)
            turn.set_min_generated_tokens(new_tokens)
            turn.set_do_sample(False)
            request.begin_turn(np.asarray(ids, dtype=np.int32), turn)
            requests.append(request)
        tokens = 0
        while engine.has_pending_requests():
            tokens += sum(1 for _ in engine.run(buffer))
        out[batch] = tokens / (time.perf_counter() - start)
        for request in requests:
            request.close()
        del engine
    return out


def register(sub) -> None:
    s = sub.add_parser("serve", help="phitune serve on loopback: tok/s, req/s, TTFT and latency at "
                                     "1-8 clients mixing two adapters and the base; a soak")
    s.add_argument("--phi3-mini-layers", type=int, default=4,
                   help="layers of the Phi-3-mini-shaped model (32 = full size)")
    s.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    s.add_argument("--requests_per_client", type=int, default=3)
    s.add_argument("--arrivals", choices=[*ARRIVALS, "both"], default="both",
                   help="clients start at once (lockstep), or client i of N i/N of one "
                        "request's solo latency later (staggered); both: a row of each")
    s.add_argument("--new_tokens", type=int, default=64)
    s.add_argument("--soak", type=int, default=1000, help="soak requests (0 = skip)")
    s.add_argument("--soak_tokens", type=int, default=4)
    s.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                   help="also og.Engine's batching of base-model requests, for reference")
    s.add_argument("--max_minutes", type=float, default=30, help="stop sending requests after this")
    s.add_argument("--cache", default=str(CACHE))
    s.set_defaults(func=bench_serve)
