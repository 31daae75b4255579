"""`acecap serve`: the Captioner behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Requests are checked and their audio decoded on the event loop's worker threads; the Batcher's single
thread owns the device and captions whatever has gathered as one batch. Answers come back to the loop
through futures (and, when streaming, a queue of tokens).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from . import batching
from .batching import Batcher, QueueFull
from .captioner import DEFAULT_MAX_DURATION, Result
from .chat import APIError, AudioAccess, chunk, completion, fetch_audio, finish_reason, parse_chat, usage
from .generate import Decoding

log = logging.getLogger("acecap")
COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits; every one has a flag of the same name in `acecap serve`."""

    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_batch_size: int | None = None  # None: annotate's default (32 on a CPU, 64 on an accelerator)
    max_wait_ms: float = 10.0  # how long an idle device waits for more requests to batch with the first
    max_queue: int = 256  # requests waiting for the device beyond this get 503
    max_body_mb: float = 100.0  # request bodies beyond this get 413
    max_duration: float = DEFAULT_MAX_DURATION  # audio longer than this (s) gets 413
    max_new_tokens: int = 512  # default and cap for a request's max_tokens
    timeout_s: float = 600.0  # from arrival to the last token; then 504
    access: AudioAccess = field(default_factory=AudioAccess)


class _Metrics:
    """Prometheus series for one app (its own registry, so several apps can live in one process)."""

    def __init__(self, batcher: Batcher):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("acecap_requests", "Chat completion requests answered, by status", ["status"],
                                registry=r)  # fmt: skip
        self.errors = Counter("acecap_errors", "Error answers, by OpenAI error type", ["type"], registry=r)
        self.latency = Histogram("acecap_request_seconds", "Arrival to last byte of a chat completion", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))  # fmt: skip
        self.batch_size = Histogram("acecap_batch_size", "Requests captioned together", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip
        self.batch_seconds = Histogram("acecap_batch_seconds", "Device time per batch", registry=r)
        self.prompt_tokens = Counter("acecap_prompt_tokens", "Prompt tokens read (text and audio)", registry=r)
        self.completion_tokens = Counter("acecap_completion_tokens", "Tokens generated", registry=r)
        self.audio_seconds = Counter("acecap_audio_seconds", "Seconds of audio captioned", registry=r)
        Gauge("acecap_queue_depth", "Requests waiting for the device", registry=r).set_function(lambda: batcher.waiting)
        Gauge("acecap_running", "Requests in the batch on the device", registry=r).set_function(lambda: batcher.running)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def answered(self, status: int, started: float, kind: str | None = None, result: Result | None = None) -> None:
        self.requests.labels(str(status)).inc()
        self.latency.observe(time.monotonic() - started)
        if kind:
            self.errors.labels(kind).inc()
        if result is not None:
            self.prompt_tokens.inc(result.prompt_tokens)
            self.completion_tokens.inc(result.tokens)
            self.audio_seconds.inc(result.captioned_seconds)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_big = APIError(413, f"request body over the server's limit of {limit / 2**20:g} MiB (--max-body-mb)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(captioner, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving `captioner`; the batcher thread runs while the app's lifespan does."""
    config = config or ServeConfig()
    limit = captioner.max_duration_limit(Decoding(max_new_tokens=config.max_new_tokens))
    if not 0 < config.max_duration <= limit:
        raise ValueError(f"--max-duration must be in (0, {limit:.0f}] s with --max-new-tokens "
                         f"{config.max_new_tokens}: the model's context holds no more")  # fmt: skip
    batcher = Batcher(
        captioner,
        max_batch=config.max_batch_size or batching.default_batch_size(captioner.device.type),
        max_wait_s=config.max_wait_ms / 1000,
        max_queue=config.max_queue,
        max_duration=config.max_duration,
    )
    metrics = _Metrics(batcher)
    batcher.on_batch = metrics.batch
    model_id = str(captioner.model_name)
    tokenizer = captioner.processor.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="acecap", lifespan=lifespan)

    @app.middleware("http")
    async def request_id(request: Request, call_next) -> Response:
        """Every answer, refusals included, carries the caller's X-Request-Id (or a new one) for matching."""
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting, "running": batcher.running}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        entry = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "acecap",
                 "max_model_len": captioner.context}  # fmt: skip
        return {"object": "list", "data": [entry]}

    @app.post(COMPLETIONS)
    async def chat(request: Request) -> Response:
        started = time.monotonic()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            check_key(request)
            body = await _read_body(request, int(config.max_body_mb * 2**20))
            try:  # off the event loop: a body may hold 100 MB of base64
                parsed = parse_chat(await asyncio.to_thread(json.loads, body), config.max_new_tokens)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise APIError(400, f"the request body is not valid JSON: {error}") from None
            if parsed.model is not None and parsed.model != model_id:
                raise APIError(404, f"model {parsed.model!r} is not served here; this server has {model_id!r}",
                               kind="not_found_error", param="model")  # fmt: skip
            # Decodes at most --max-duration; the clip's duration is the whole audio's, from its header.
            clip = await asyncio.to_thread(fetch_audio, parsed.audio, config.access, config.max_duration)
            if clip.duration > config.max_duration:
                raise APIError(413, f"the audio is {clip.duration:.1f} s long; this server takes at most "
                               f"{config.max_duration:g} s (--max-duration)")  # fmt: skip
            answers: asyncio.Queue = asyncio.Queue()  # tokens (when streaming), then the Result or error text
            loop = asyncio.get_running_loop()
            job = batching.Request(
                clip=clip,
                prompt=parsed.prompt or captioner.prompt,
                decoding=parsed.decoding,
                answer=lambda result: loop.call_soon_threadsafe(answers.put_nowait, result),
                on_token=(lambda token: loop.call_soon_threadsafe(answers.put_nowait, token))
                if parsed.stream
                else None,
            )
            try:
                batcher.submit(job)
            except QueueFull:
                raise APIError(503, f"the server is busy ({config.max_queue} requests waiting); retry shortly",
                               kind="overloaded_error", headers={"Retry-After": "1"}) from None  # fmt: skip
        except APIError as error:
            metrics.answered(error.status, started, error.kind)
            raise
        deadline = started + config.timeout_s
        if parsed.stream:
            stream = _stream(job, answers, deadline, request_id, model_id, tokenizer, captioner.end_ids,
                             parsed.include_usage, metrics, started)  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            result = await _next(answers, deadline, job)
            if isinstance(result, str):
                raise APIError(500, f"captioning failed: {result}", kind="server_error")
        except APIError as error:
            metrics.answered(error.status, started, error.kind)
            raise
        metrics.answered(200, started, result=result)
        return JSONResponse(completion(request_id, model_id, result))

    return app


async def _next(answers: asyncio.Queue, deadline: float, job: batching.Request):
    """The next token or answer for `job`; past the deadline the job is dropped and 504 raised."""
    try:
        return await asyncio.wait_for(answers.get(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        job.cancelled = True
        raise APIError(504, "the request timed out before its caption was finished", kind="timeout_error") from None


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(job, answers, deadline, request_id, model, tokenizer, end_ids, include_usage, metrics,
                  started) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: the role, text deltas as tokens arrive, the finish reason, usage, [DONE]."""
    yield _sse(chunk(request_id, model, {"role": "assistant", "content": ""}))
    ids: list[int] = []
    sent = ""
    ended = False
    try:
        while True:
            item = await _next(answers, deadline, job)
            if not isinstance(item, int):
                break
            if ended or item in end_ids:
                ended = True
                continue
            ids.append(item)
            text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            # Hold back a character still being spelled across tokens, and any change to earlier text.
            if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                yield _sse(chunk(request_id, model, {"content": text[len(sent) :]}))
                sent = text
        if isinstance(item, str):
            raise APIError(500, f"captioning failed: {item}", kind="server_error")
    except APIError as error:
        metrics.answered(error.status, started, error.kind)
        yield _sse(error.body())
        yield "data: [DONE]\n\n"
        return
    finally:
        job.cancelled = True  # a client gone mid-stream frees its place if the batch has not started
    if item.text.startswith(sent) and len(item.text) > len(sent):
        yield _sse(chunk(request_id, model, {"content": item.text[len(sent) :]}))
    yield _sse(chunk(request_id, model, {}, finish_reason(item)))
    if include_usage:
        yield _sse(chunk(request_id, model, {}, tokens=usage(item)))
    yield "data: [DONE]\n\n"
    metrics.answered(200, started, result=item)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made before uvicorn takes over wait in the backlog, not refused
    return sock


def _server(captioner, config: ServeConfig, access_log: bool):
    import uvicorn

    app = create_app(captioner, config)
    # Graceful shutdown waits for in-flight requests up to their own timeout.
    settings = uvicorn.Config(app, log_level="info", access_log=access_log,
                              timeout_graceful_shutdown=int(config.timeout_s) + 1)  # fmt: skip
    return uvicorn.Server(settings)


def serve(captioner, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT or SIGTERM; in-flight requests are finished before it returns."""
    config = config or ServeConfig()
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d/v1 (Ctrl-C stops)", captioner.model_name, shown, sock.getsockname()[1])
    _server(captioner, config, access_log=True).run(sockets=[sock])


@contextmanager
def running(captioner, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread for the `with` block; yields the base URL (port 0: any free port).

    >>> with running(captioner) as url:
    ...     OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(...)
    """
    sock = _bind(host, port)
    server = _server(captioner, config or ServeConfig(), access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="acecap-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start (see the log)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
