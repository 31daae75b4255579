"""`acecap serve`: the Captioner behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Requests are checked and their audio decoded on the event loop's worker threads; files and URLs are read
on workers of their own, within a deadline, so a slow source cannot hold the threads other requests need.
Every request is checked whole (settings, text, audio, its fit in the context) before it joins a batch.
The Batcher's single thread owns the device and captions whatever has gathered as one batch. Answers come
back to the loop through futures (and, when streaming, a queue of tokens).
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import batching
from .audio import Clip
from .batching import Batcher, QueueFull
from .captioner import DEFAULT_MAX_DURATION, Result
from .chat import APIError, chunk, completion, finish_reason, parse_chat, usage
from .fetch import AudioAccess, fetch_audio, reaches_out, too_slow
from .generate import Decoding
from .hub import served_name
from .prompts import PromptRules

log = logging.getLogger("acecap")
COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits; every one has a flag of the same name in `acecap serve`."""

    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    served_model_name: tuple[str, ...] = ()  # names requests may use, the first listed; () : served_name(model)
    max_batch_size: int | None = None  # None: annotate's default (32 on a CPU, 64 on an accelerator)
    max_wait_ms: float = 10.0  # how long an idle device waits for more requests to batch with the first
    max_queue: int = 256  # requests waiting for the device beyond this get 503
    max_body_mb: float = 100.0  # request bodies beyond this get 413
    max_duration: float = DEFAULT_MAX_DURATION  # audio longer than this (s) gets 413
    max_new_tokens: int = 512  # default and cap for a request's max_tokens
    timeout_s: float = 600.0  # from arrival to the last token; then 504
    fetch_workers: int = 32  # threads reading file:// and http(s) audio, apart from the shared ones
    access: AudioAccess = field(default_factory=AudioAccess)

    def __post_init__(self) -> None:
        for name, value, low in (("fetch-workers", self.fetch_workers, 1), ("max-batch-size", self.max_batch_size, 1),
                                 ("max-queue", self.max_queue, 1), ("max-wait-ms", self.max_wait_ms, 0)):  # fmt: skip
            if value is not None and value < low:
                raise ValueError(f"--{name} must be at least {low}")
        for name, value in (("timeout", self.timeout_s), ("max-body-mb", self.max_body_mb)):
            if not value > 0:  # 0 would refuse every request
                raise ValueError(f"--{name} must be above 0")


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
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise APIError(400, "the client went away before its request body was complete") from None
    return bytes(body)


def _json(body: bytes):
    """The decoded body; anything json refuses (syntax, encoding, nesting, a 5,000-digit number) is a 400."""
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, the int digits limit
        raise APIError(400, f"the request body is not valid JSON: {error}") from None


def _internal(error: BaseException) -> APIError:
    """An unexpected failure, answered in the OpenAI shape; the details go to the server's log only."""
    log.error("request failed", exc_info=error)
    return APIError(500, f"internal server error ({type(error).__name__}); the server's log has the details",
                    kind="server_error")  # fmt: skip


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _audio(source: tuple[str, str], access: AudioAccess, fetch_pool: ThreadPoolExecutor,
                 max_seconds: float) -> Clip:  # fmt: skip
    """The request's audio, at most `max_seconds` of it decoded: carried in the request, decoded on the shared
    workers; from a file or URL, read on the fetch workers within --fetch-timeout (a source that never ends
    holds only its own worker)."""
    if not reaches_out(source):
        return await asyncio.to_thread(fetch_audio, source, access, None, max_seconds)
    deadline = time.monotonic() + access.timeout_s
    reading = asyncio.get_running_loop().run_in_executor(fetch_pool, fetch_audio, source, access, deadline,
                                                         max_seconds)  # fmt: skip
    try:
        return await asyncio.wait_for(reading, access.timeout_s)
    except asyncio.TimeoutError:
        raise too_slow(access) from None


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
    names = config.served_model_name or (served_name(str(captioner.model_name)),)
    model_id = names[0]
    tokenizer = captioner.processor.tokenizer
    rules = PromptRules.of(captioner)
    fetch_pool = ThreadPoolExecutor(config.fetch_workers, thread_name_prefix="acecap-fetch")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        fetch_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(batcher.stop)  # after uvicorn has let in-flight requests finish

    # No /docs, /redoc or /openapi.json: the generated schema would document nothing (the endpoints read raw
    # bodies in OpenAI's shape, which the README documents) and the pages load their scripts from a CDN.
    app = FastAPI(title="acecap", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def request_id(request: Request, call_next) -> Response:
        """Every answer, refusals included, carries the caller's X-Request-Id (or a new one) for matching;
        an unexpected failure outside the chat endpoint is still answered in the OpenAI shape and counted."""
        try:
            response = await call_next(request)
        except Exception as failure:
            error = _internal(failure)
            metrics.errors.labels(error.kind).inc()
            response = _error(error)
        response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        metrics.errors.labels(error.kind).inc()  # the chat endpoint answers its own errors; these are the others'
        return _error(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        answer = APIError(error.status_code, str(error.detail), kind="not_found_error" if error.status_code == 404
                          else "invalid_request_error")  # fmt: skip
        return await api_error(request, answer)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")  # fmt: skip

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers' health checks use either
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

    async def checked(request: Request) -> tuple:
        """The request, parsed and checked whole, with its audio: everything that could fail it in a batch."""
        check_key(request)
        body = await _read_body(request, int(config.max_body_mb * 2**20))
        # Off the event loop: a body may hold 100 MB of base64, a prompt 100 MB of text.
        parsed = parse_chat(await asyncio.to_thread(_json, body), config.max_new_tokens)
        if parsed.model is not None and parsed.model not in names:
            raise APIError(404, f"model {parsed.model[:100]!r} is not served here; this server has {model_id!r}",
                           kind="not_found_error", param="model")  # fmt: skip
        max_tokens = parsed.decoding.max_new_tokens
        text_tokens = await asyncio.to_thread(rules.text_tokens, parsed.prompt, max_tokens)
        # Decodes at most --max-duration; the clip's duration is the whole audio's, from its header.
        clip = await _audio(parsed.audio, config.access, fetch_pool, config.max_duration)
        if clip.duration > config.max_duration:
            raise APIError(413, f"the audio is {clip.duration:.1f} s long; this server takes at most "
                           f"{config.max_duration:g} s (--max-duration)")  # fmt: skip
        rules.check_total(text_tokens, len(clip.samples), max_tokens)
        return parsed, clip

    @app.post(COMPLETIONS)
    async def chat(request: Request) -> Response:
        started = time.monotonic()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            try:  # a body sent slowly, a file fetched slowly: --timeout counts from arrival
                parsed, clip = await asyncio.wait_for(checked(request), config.timeout_s)
            except asyncio.TimeoutError:
                raise APIError(504, "the request was not read and checked within the server's --timeout",
                               kind="timeout_error") from None  # fmt: skip
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
            deadline = started + config.timeout_s
            if parsed.stream:
                stream = _stream(job, answers, deadline, request_id, model_id, tokenizer, captioner.end_ids,
                                 parsed.include_usage, metrics, started)  # fmt: skip
                return StreamingResponse(stream, media_type="text/event-stream")
            result = await _next(answers, deadline, job)
            if isinstance(result, str):
                raise APIError(500, f"captioning failed: {result}", kind="server_error")
            answer = JSONResponse(completion(request_id, model_id, result))
        except Exception as failure:
            error = failure if isinstance(failure, APIError) else _internal(failure)
            metrics.answered(error.status, started, error.kind)
            return _error(error)
        metrics.answered(200, started, result=result)
        return answer

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
    counted = False
    try:
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
        except Exception as failure:  # the status line is sent: the error goes out as the stream's last event
            error = failure if isinstance(failure, APIError) else _internal(failure)
            metrics.answered(error.status, started, error.kind)
            counted = True
            yield _sse(error.body())
            yield "data: [DONE]\n\n"
            return
        if item.text.startswith(sent) and len(item.text) > len(sent):
            yield _sse(chunk(request_id, model, {"content": item.text[len(sent) :]}))
        yield _sse(chunk(request_id, model, {}, finish_reason(item)))
        if include_usage:
            yield _sse(chunk(request_id, model, {}, tokens=usage(item)))
        yield "data: [DONE]\n\n"
        metrics.answered(200, started, result=item)
        counted = True
    finally:
        job.cancelled = True  # a client gone mid-stream frees its place if the batch has not started
        if not counted:  # the client left (a disconnect closes this generator): counted as nginx does
            metrics.answered(499, started, "client_closed_error")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made before uvicorn takes over wait in the backlog, not refused
    return sock


def check_address(host: str, port: int) -> None:
    """Fail now, not after minutes of loading the model, when the address cannot be listened on."""
    try:
        _bind(host, port).close()
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


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
