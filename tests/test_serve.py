"""`phitune serve`: a real server on a free loopback port, driven with the official `openai`
client (and raw HTTP for the bad inputs the client would refuse to send), against a direct
onnxruntime-genai greedy loop on the same tiny model and adapters."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import help_run
from genai_helpers import direct, lora_params, user, write_adapter

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent
BASE = "base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`phitune serve` in a subprocess; its stderr (the request log) in a file."""

    def __init__(self, tmp: Path, model: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.log = tmp / f"serve-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phitune", "serve", "-m", str(model), "--model_name", BASE,
             "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), cwd=REPO,
            env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"phitune serve exited {self.proc.returncode}: {self.text()}")
            try:
                if http("GET", self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"phitune serve did not start: {self.text()}")

    def client(self, key: str = "unused", **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60,
                             **kwargs)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one raw request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def tone_file(tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapters") / "tone.onnx_adapter",
                         lora_params(rank=8, seed=1))


@pytest.fixture(scope="module")
def server(lora_model, adapter_file, tone_file, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"), lora_model, "--adapter", f"{adapter_file}=travel",
                 "--adapter", f"{tone_file}=tone")
    yield srv
    assert srv.stop() == 0, srv.text()


QUESTION = user("What is a list?")


def chat(srv: Server, model: str, messages=QUESTION, n: int = 12, **kwargs):
    return srv.client().chat.completions.create(model=model, messages=messages, max_tokens=n,
                                                temperature=0, **kwargs)


# ---------------------------------------------------------------- the OpenAI surface

def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in server.client().models.list()] == [BASE, "travel", "tone"]
    assert server.client().models.retrieve("tone").id == "tone"


def test_chat_is_the_greedy_answer_with_usage(server, lora_model):
    expected, tokens = direct(lora_model, QUESTION, n=12)
    reply = chat(server, BASE)
    assert reply.choices[0].message.content == expected and expected.strip()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12 and reply.usage.prompt_tokens > 5


def test_the_model_name_picks_the_adapter(server, lora_model, adapter_file, tone_file):
    base, travel, tone = (chat(server, m).choices[0].message.content for m in (BASE, "travel", "tone"))
    assert travel == direct(lora_model, QUESTION, n=12, adapter=adapter_file)[0]
    assert tone == direct(lora_model, QUESTION, n=12, adapter=tone_file)[0]
    assert len({base, travel, tone}) == 3  # each adapter changes the answer


def test_stream_sends_the_same_text_and_ends_with_usage(server):
    whole = chat(server, "travel").choices[0].message.content
    chunks = list(chat(server, "travel", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stream_is_server_sent_events_ending_with_done(server):
    request = urllib.request.Request(server.url + "/v1/completions", method="POST", data=json.dumps(
        {"model": BASE, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_continue_the_raw_prompt(server, lora_model):
    prompt = "def add(a, b):"
    expected, _ = direct(lora_model, text=prompt, n=10)
    reply = server.client().completions.create(model=BASE, prompt=prompt, max_tokens=10,
                                               temperature=0)
    assert reply.choices[0].text == expected and reply.usage.completion_tokens == 10


def test_a_stop_string_ends_the_answer_before_it(server):
    whole = chat(server, BASE, n=24).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert stop.strip(), whole
    cut = chat(server, BASE, n=24, stop=[stop])
    assert cut.choices[0].message.content == whole[:whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server):
    def sample():
        return server.client().chat.completions.create(
            model="tone", messages=QUESTION, max_tokens=16, temperature=0.9, top_p=0.9,
            seed=7).choices[0].message.content
    assert sample() == sample()


def test_concurrent_requests_with_different_adapters_answer_as_alone(server):
    jobs = [(BASE, user("What is a list?")), ("travel", user("Plan a day in Lisbon.")),
            ("tone", user("What is a list?")), ("travel", user("What is a list?"))]
    alone = [chat(server, m, q, n=24).choices[0].message.content for m, q in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: chat(server, job[0], job[1], n=24), jobs))
    assert [r.choices[0].message.content for r in together] == alone
    log = server.text()
    assert "POST /v1/chat/completions model=travel status=200 tokens=" in log
    # each answered request logs its time to first token, at most its whole time
    line = [ln for ln in log.splitlines() if "model=travel status=200" in ln][-1]
    ttft, whole = (int(line.split(f"{key}=")[1].split()[0]) for key in ("ttft_ms", "ms"))
    assert 0 < ttft <= whole, line


def test_a_client_that_disconnects_stops_its_generation(server):
    stream = chat(server, BASE, n=1500, stream=True)
    next(iter(stream)), next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while http("GET", server.url + "/health")[1]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http("GET", server.url + "/health")[1]["active"] == 0
    line = [ln for ln in server.text().splitlines() if "cancelled" in ln][-1]
    done = int(line.split("tokens=")[1].split()[0].split("+")[1])
    assert done < 1500, line


# ---------------------------------------------------------------- bad input: 4xx, never 500

LONG = "word " * 3000  # > the 2048-token context


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000, 400, None),  # was a 500, plain text
    ("/v1/completions", b'{"model": "x", "prompt": ' + b"[" * 900 + b"]" * 900 + b"}", 400,
     "prompt"),
    ("/v1/chat/completions", {"model": BASE}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "max_tokens": -3}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "max_tokens": "9"}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "max_tokens": 5000}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"model": BASE, "messages": user(LONG)}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": BASE, "messages": QUESTION, "tools": []}, 400, "tools"),
    ("/v1/chat/completions", {"model": "nope", "messages": QUESTION}, 404, "model"),
    ("/v1/completions", {"model": BASE, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": BASE}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stop": [""]}, 400, "stop"),
])
def test_bad_input_is_a_4xx_in_openai_shape(server, path, body, status, param):
    got, reply = http("POST", server.url + path, body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert reply["error"]["param"] == param
    assert http("GET", server.url + "/health")[0] == 200  # the server lives on


def test_a_client_gone_mid_body_is_one_log_line(server):
    """It sends half its declared body and hangs up: one log line (status 499), no
    ClientDisconnect traceback, and the server answers the next request."""
    before = len(server.text().splitlines())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": "')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while len(server.text().splitlines()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    new = server.text().splitlines()[before:]
    assert len(new) == 1 and "status=499" in new[0], new
    assert http("GET", server.url + "/health")[0] == 200


def test_unknown_route_body_too_large_and_the_client_error_types(server):
    assert http("GET", server.url + "/v1/nothing")[0] == 404
    assert http("GET", server.url + "/v1/chat/completions")[0] == 405
    huge = {"model": BASE, "messages": user("x" * (1100 * 1024))}
    status, reply = http("POST", server.url + "/v1/chat/completions", huge)
    assert status == 413 and reply["error"]["code"] == "body_too_large"
    with pytest.raises(openai.NotFoundError) as caught:
        chat(server, "no-such-adapter")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        chat(server, BASE, n=99999)


# ---------------------------------------------------------------- auth, queue, shutdown

def test_api_key_queue_limit_and_clean_shutdown(lora_model, tmp_path):
    srv = Server(tmp_path, lora_model, "--no-adapter", "--parallel", "1", "--max_queue", "0",
                 "--shutdown_timeout", "2", env={"PHITUNE_API_KEY": "sesame"})
    try:
        assert http("GET", srv.url + "/health")[0] == 200  # open: for load balancers
        assert http("GET", srv.url + "/v1/models")[0] == 401
        status, reply = http("GET", srv.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert [m.id for m in srv.client("sesame").models.list()] == [BASE]

        # one decoding slot, no queue: a second request while one streams is a 429
        stream = srv.client("sesame").chat.completions.create(
            model=BASE, messages=QUESTION, max_tokens=1500, temperature=0, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            srv.client("sesame").chat.completions.create(model=BASE, messages=QUESTION, max_tokens=2)

        # SIGTERM mid-answer: stop accepting, cancel the answer at --shutdown_timeout, exit 0
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert srv.proc.wait(timeout=30) == 0, srv.text()
        assert time.monotonic() - start < 15
        assert "stopped: 1 answer(s) still running" in srv.text()
    finally:
        srv.stop()


def test_a_taken_port_is_one_error_line(cli, genai_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "-m", str(genai_model), "--port", str(taken.getsockname()[1]))
    assert result.code == 2 and result.error_lines and "cannot listen" in result.error_lines[0]


def test_help_imports_no_server_library():
    out = help_run("serve", ("starlette", "uvicorn", "onnxruntime_genai", "torch"))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr
