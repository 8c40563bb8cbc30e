"""The HTTP side of `phitune serve`: OpenAI's routes on Starlette, and one ASGI gate in front
that checks the API key and the body size and logs one line per request.

Every error leaves as OpenAI's error JSON with a 4xx (a 5xx only for a bug, which ends that
request and never the server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from phitune import genai_config
from phitune.errors import PhituneError
from phitune.infer.session import Sampling, Session
from phitune.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from phitune.serve.schemas import ApiError, ChatRequest, CompletionRequest, parse

# Without max_tokens an answer may run this long (OpenAI's default is "until the context is
# full", which would make every request allocate a full-context KV cache).
DEFAULT_MAX_TOKENS = 512


@dataclass
class ServeConfig:
    base_id: str
    adapters: list[str]
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names; None for the base model; 404 otherwise."""
        if model == self.base_id:
            return None
        if model in self.adapters:
            return model
        raise ApiError(404, f"The model `{model}` does not exist (served: "
                            f"{', '.join([self.base_id, *self.adapters])})",
                       param="model", code="model_not_found")


def error_response(error: ApiError):
    return JSONResponse(error.body(), status_code=error.status)


def build_app(session: Session, scheduler: Scheduler, config: ServeConfig):

    api = Api(session, scheduler, config)
    routes = [Route("/health", api.health, methods=["GET"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.model, methods=["GET"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error,
                                                       HTTPException: _http_error})
    return Gate(app, config)


async def _api_error(request, exc: ApiError):
    return error_response(exc)


async def _http_error(request, exc):
    """Starlette's own 404 and 405, in OpenAI's error shape."""
    kind = {404: "Unknown route", 405: "Method not allowed"}.get(exc.status_code, exc.detail)
    return error_response(ApiError(exc.status_code, f"{kind}: {request.method} {request.url.path}",
                                   code="not_found" if exc.status_code == 404 else None))


class Api:
    """The routes' endpoints: one method per route, over the one session and scheduler."""

    def __init__(self, session: Session, scheduler: Scheduler, config: ServeConfig):
        self.session, self.scheduler, self.config = session, scheduler, config

    async def health(self, request):
        return JSONResponse({"status": "ok", **self.scheduler.load()})

    def _model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.config.created,
                "owned_by": "phitune"}

    async def models(self, request):
        ids = [self.config.base_id, *self.config.adapters]
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in ids]})

    async def model(self, request):
        name = request.path_params["model"]
        self.config.adapter_for(name)
        return JSONResponse(self._model_card(name))

    async def chat_completions(self, request):
        body = parse(await _read_body(request, self.config.max_body_bytes), ChatRequest)
        request.state.model = body.model
        adapter = self.config.adapter_for(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = self.session.prompt_ids(self.session.chat_prompt(messages))
        except PhituneError as exc:  # a template that rejects these messages
            raise ApiError(400, exc.what, param="messages") from None
        return await self._generate(request, body, ids, adapter, chat=True)

    async def completions(self, request):
        body = parse(await _read_body(request, self.config.max_body_bytes), CompletionRequest)
        request.state.model = body.model
        adapter = self.config.adapter_for(body.model)
        return await self._generate(request, body, self._prompt_ids(body.prompt), adapter,
                                    chat=False)

    def _prompt_ids(self, prompt) -> list[int]:
        """A completion's prompt as token ids: a string (or a list of one) is encoded and
        started as the model's sequences start; a list of ids is the caller's sequence as
        given, checked against the vocabulary."""
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.session.encode(prompt)
            ids = self.session.sequence(ids) if ids else ids  # nothing to start: refused below
        else:
            vocab = genai_config.vocab_size(self.session.model_dir)
            if any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"Invalid 'prompt': token ids must be in [0, {vocab})",
                               param="prompt", code="invalid_value")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "Invalid 'prompt': it encodes to no tokens", param="prompt")
        return ids

    async def _generate(self, request, body, ids: list[int], adapter: str | None, chat: bool):
        job = Job(ids, self._sampling(body, ids, chat), adapter, body.stops(),
                  asyncio.get_running_loop())
        self._submit(job)
        request.state.job = job
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, rid, created, body.model, chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return _completion(await _collect(request, job), job, rid, created, body.model, chat)

    def _sampling(self, body, ids: list[int], chat: bool) -> Sampling:
        """The request's sampling, its answer length checked against the context."""
        context = self.session.context_length
        limit = body.limit()
        if len(ids) >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                                f"prompt is {len(ids)} tokens. Shorten it.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if limit is not None and len(ids) + limit > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, "
                                f"you requested {len(ids) + limit} tokens ({len(ids)} in the prompt, "
                                f"{limit} for the completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        max_new = limit if limit is not None else min(self.config.default_max_tokens,
                                                      context - len(ids))
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        top_p = body.top_p if body.top_p is not None and body.top_p < 1 and temperature > 0 else None
        return Sampling(max_new_tokens=max_new, temperature=temperature, top_p=top_p,
                        seed=body.seed)

    def _submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, "Too many requests are waiting; retry shortly",
                           type_="rate_limit_exceeded", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "The server is shutting down", type_="server_error",
                           code="shutting_down") from None


def _completion(text: str, job: Job, rid: str, created: int, model: str, chat: bool):
    """The whole answer as one JSON response (a chat.completion or a text_completion)."""
    choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": model, "choices": [choice],
                         "usage": _usage(job)})


# A body over the limit is still read (and dropped) up to this many times the limit before
# the 413, so that a client which sends its whole body before reading (most do) sees the 413
# rather than a broken pipe; anything larger is cut off at once.
DRAIN_FACTOR = 16


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its Content-Length, or while read)."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    too_large = ApiError(413, f"The body is {'over ' if declared is None else ''}"
                              f"{declared or limit} bytes; this server takes at most {limit} "
                              "(--max_body_kb)", code="body_too_large")
    if declared is not None and declared > DRAIN_FACTOR * limit:
        raise too_large
    from starlette.requests import ClientDisconnect
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body: nothing to answer; the request's log line says 499
        raise ApiError(499, "the client disconnected before sending the whole body",
                       code="client_disconnected") from None
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def _collect(request, job: Job) -> str:
    """The whole answer; the generation is cancelled if the client goes away meanwhile."""
    pieces = []
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "client closed the request", code="client_closed") from None
                continue
            if kind == "text":
                pieces.append(payload)
            elif kind == "error":
                raise ApiError(500, payload, type_="server_error", code="generation_failed")
            elif job.finish_reason == "cancelled":
                raise _SHUTDOWN
            else:
                return "".join(pieces)
    finally:
        if job.finish_reason is None:
            job.cancel()


async def _sse(job: Job, rid: str, created: int, model: str, chat: bool, usage: bool):
    """Server-sent events in OpenAI's chunk shapes, ending with `data: [DONE]`. A client that
    disconnects cancels this generator (Starlette), whose `finally` cancels the job."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            body = {"role": "assistant", "content": ""} if role else \
                ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        event = {"id": rid, "object": kind_name, "created": created, "model": model,
                 "choices": [choice]}
        return f"data: {json.dumps(event)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield chunk(payload, None)
            elif kind == "error":
                error = ApiError(500, payload, type_="server_error", code="generation_failed")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            elif job.finish_reason == "cancelled":  # the server is stopping
                yield f"data: {json.dumps(_SHUTDOWN.body())}\n\n"
                break
            else:
                yield chunk(None, job.finish_reason)
                if usage:
                    event = {"id": rid, "object": kind_name, "created": created, "model": model,
                             "choices": [], "usage": _usage(job)}
                    yield f"data: {json.dumps(event)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if job.finish_reason is None:
            job.cancel()


_SHUTDOWN = ApiError(503, "The server is shutting down; this answer was cancelled",
                     type_="server_error", code="shutting_down")


def _usage(job: Job) -> dict:
    prompt = len(job.ids)
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens}


class Gate:
    """ASGI middleware: API key (all but /health), body size by Content-Length, and one log
    line per request on stderr: method, path, model, status, tokens, ms. A bug inside a
    route becomes a 500 in OpenAI's shape; the server keeps serving."""

    OPEN = {"/health"}

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        scope.setdefault("state", {})
        status = [None]

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is not None:
                await _send_error(tracked, error)
            else:
                await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            status[0] = status[0] or 499
            raise
        except Exception as exc:  # noqa: BLE001 — a bug: this request fails, the server lives
            if status[0] is None:
                await _send_error(tracked, ApiError(500, f"internal error: {type(exc).__name__}",
                                                    type_="server_error"))
            import traceback
            traceback.print_exc(file=sys.stderr)
        finally:
            self._log(scope, status[0], start)

    def _refuse(self, scope) -> ApiError | None:
        if self.key is not None and scope["path"] not in self.OPEN:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                     "KEY'", code="invalid_api_key")
        return None

    def _log(self, scope, status, start: float) -> None:
        state = scope.get("state", {})
        job = state.get("job")
        tokens = f"{len(job.ids)}+{job.completion_tokens}" if job is not None else "-"
        if job is not None and job.cancelled.is_set():
            tokens += " cancelled"
        # ttft_ms: submitted to the first token chosen (streamed text may come later: a token
        # can be part of a character)
        ttft = f" ttft_ms={job.ttft_s * 1e3:.0f}" if job is not None and job.ttft_s else ""
        line = (f"{scope['method']} {scope['path']} model={state.get('model', '-')} "
                f"status={status or '-'} tokens={tokens} ms={(time.perf_counter() - start) * 1e3:.0f}"
                f"{ttft}")
        print(line, file=sys.stderr, flush=True)


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
