"""`acecap review OUT`: listen to, check and correct an annotate job's labels in the browser.

A FastAPI app over the Catalog (the in-memory table of the job's files) and the review store. Pages and
their script are package data (review_static/), so it works offline. Audio is streamed with HTTP range
requests, and only for files the records name: the browser sends ids, never paths. Bound to a loopback
address it answers only requests addressed to that name (no DNS rebinding); bound elsewhere it needs a
token, given once in the URL (as Jupyter does) and then kept in a cookie, or as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import ipaddress
import logging
import mimetypes
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .audio import AudioError, load_audio
from .catalog import FLAGS, PAGE_SIZES, SORTS, STATUSES, Catalog, Entry, Query
from .inputs import shown
from .reviews import DatasetFiles, append_review, changes, check_fields, write_sidecar_changes
from .writers import atomic_write, to_json

log = logging.getLogger("acecap")

STATIC = resources.files("acecap") / "review_static"
COOKIE = "acecap_review_token"
IMAGE_SIZE = (1200, 240)  # the file view's waveform and spectrogram, in pixels
CACHE = "review-cache"  # under OUT: the images, keyed by the audio file's path, size and mtime
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without its port ('[::1]:80' → '::1')."""
    if header.startswith("["):
        return header[1 : header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _first_line(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _row(entry: Entry) -> dict:
    """An entry as a line of the table."""
    fields = entry.fields
    lyrics = fields["lyrics"]
    sung = None if lyrics is None else "\n".join(line for line in lyrics.splitlines() if not line.startswith("["))
    return {
        "id": entry.id,
        "path": entry.shown,
        "duration": entry.duration,
        "caption": _first_line(fields["caption"], 160),
        "lyrics": "instrumental" if fields["is_instrumental"] else _first_line(sung or lyrics, 80),
        "language": fields["language"],
        "bpm": fields["bpm"],
        "keyscale": fields["keyscale"],
        "timesignature": fields["timesignature"],
        "confidence": entry.confidence,
        "flags": entry.flags,
        "status": entry.status,
    }


def version(entry: Entry) -> str:
    """What a page sends back with a save, to show which review it was made over."""
    return hashlib.sha1(to_json(entry.review).encode(errors="surrogateescape")).hexdigest()[:16]


def _detail(entry: Entry) -> dict:
    """An entry as the file view shows it."""
    review = entry.review and {k: entry.review[k] for k in ("approved", "reviewed_at") if k in entry.review}
    return {
        "id": entry.id,
        "path": entry.shown,
        "file": shown(entry.audio),
        "duration": entry.duration,
        "status": entry.status,
        "version": version(entry),
        "fields": entry.fields,
        "machine": entry.machine,
        "review": review,
        "confidence": entry.confidence,
        "flags": entry.flags,
        "errors": entry.errors,
        "models": entry.models,
    }


def _query(request: Request) -> Query:
    """The table's view from a request's query string (the same keys the pages keep in their URL)."""
    params = request.query_params
    try:
        below = float(params["below"]) if params.get("below") else None
    except ValueError:
        raise HTTPException(400, "below: a confidence from 0 to 1") from None
    try:
        return Query(
            status=params.get("status") or None,
            flag=params.get("flag") or None,
            below=below,
            text=params.get("q", ""),
            sort=params.get("sort") or "path",
            descending=params.get("desc") in ("1", "true"),
        )
    except ValueError as error:
        raise HTTPException(400, str(error)) from None


def render_image(path: Path, width: int = IMAGE_SIZE[0], height: int = IMAGE_SIZE[1]) -> bytes:
    """A PNG of the file: its waveform (peak envelope) above its spectrogram (40 Hz-8 kHz, log frequency),
    time running left to right over the whole width, so x maps straight onto the player's time."""
    from matplotlib.figure import Figure

    samples = load_audio(path).samples
    edges = np.linspace(0, len(samples), width + 1).astype(np.int64)
    starts = np.minimum(edges[:-1], len(samples) - 1)
    top, bottom = np.maximum.reduceat(samples, starts), np.minimum.reduceat(samples, starts)
    n_fft = 1024
    padded = np.pad(samples, (n_fft // 2, n_fft // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[starts] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    rows = np.clip(np.round(np.geomspace(40, 8000, 160) / 8000 * (n_fft // 2)).astype(int), 0, n_fft // 2)
    decibels = 10 * np.log10(power[:, rows].T + 1e-10)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="#101418")
    wave = figure.add_axes((0, 0.68, 1, 0.32))
    wave.fill_between(np.arange(width), bottom, top, color="#6ea8fe", linewidth=0)
    wave.set_xlim(0, width - 1)
    wave.set_ylim(-1, 1)
    spectrum = figure.add_axes((0, 0, 1, 0.66))
    peak = decibels.max()
    spectrum.imshow(decibels, aspect="auto", origin="lower", cmap="magma", vmin=peak - 80, vmax=peak)
    for axes in (wave, spectrum):
        axes.set_axis_off()
        axes.set_facecolor("#101418")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor=figure.get_facecolor())
    return buffer.getvalue()


class _JSON(JSONResponse):
    def render(self, content) -> bytes:
        return to_json(content).encode()  # a name that is not UTF-8 too (its bytes are lone surrogates)


def create_app(catalog: Catalog, token: str | None = None, loopback: bool = True) -> FastAPI:
    """The review app over `catalog`. `token`: required of every request (URL, cookie or bearer header);
    `loopback`: the server listens on a loopback address, so only requests addressed to one are answered."""
    dataset_files = DatasetFiles(catalog.folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(dataset_files.close)  # what is still pending is written before the server ends

    app = FastAPI(title="acecap review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  default_response_class=_JSON)  # fmt: skip
    app.state.dataset_files = dataset_files
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    saving = threading.Lock()  # one save at a time: the review line, the index and the sidecars agree
    drawing = threading.Lock()

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        if loopback and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return JSONResponse({"error": "this server answers only requests addressed to localhost"}, 403)
        if token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given.encode(), token.encode()):
                url = request.url.remove_query_params("token")  # keep the token out of history and logs
                response = RedirectResponse(str(url), status_code=303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
            sent = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(sent.encode(), token.encode()):
                message = "open the URL with ?token=… that acecap review printed, or send 'Authorization: Bearer'"
                return JSONResponse({"error": message}, 401)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    def entry_of(entry_id: int) -> Entry:
        if not 0 <= entry_id < len(catalog):
            raise HTTPException(404, f"no file {entry_id} in these records")
        return catalog.entries[entry_id]

    @app.get("/")
    def table_page() -> FileResponse:
        return FileResponse(str(STATIC / "table.html"))

    @app.get("/file/{entry_id}")
    def file_page(entry_id: int) -> FileResponse:
        entry_of(entry_id)
        return FileResponse(str(STATIC / "file.html"))

    @app.get("/api/songs")
    def songs(request: Request, page: int = 1, size: int = 50) -> dict:
        if size not in PAGE_SIZES:
            raise HTTPException(400, f"size: one of {', '.join(map(str, PAGE_SIZES))}")
        ids = catalog.select(_query(request))
        pages = max(1, -(-len(ids) // size))
        page = min(max(1, page), pages)
        shown = ids[(page - 1) * size : page * size]
        return {
            "total": len(ids),
            "page": page,
            "pages": pages,
            "size": size,
            "counts": catalog.counts(),
            "rows": [_row(catalog.entries[i]) for i in shown],
            "choices": {"status": STATUSES, "flag": FLAGS, "sort": SORTS, "size": PAGE_SIZES},
        }

    @app.get("/api/songs/{entry_id}")
    def song(request: Request, entry_id: int) -> dict:
        entry = entry_of(entry_id)
        return {**_detail(entry), "view": catalog.neighbours(_query(request), entry_id)}

    @app.post("/api/songs/{entry_id}/review")
    async def save(request: Request, entry_id: int) -> dict:
        entry = entry_of(entry_id)
        # JSON only: a cross-site form cannot send it without a CORS preflight, which this server never grants.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send the review as application/json")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("approved", False), bool):
            raise HTTPException(400, 'send {"fields": {...}, "approved": true|false}')
        with saving:
            # Two tabs on one file: the later save, made from what it loaded, would silently undo the earlier.
            current = version(entry)
            if body.get("version", current) != current:
                raise HTTPException(409, "this file was saved elsewhere (another tab?) since this page loaded: "
                                         "reload it to see those labels; yours are not saved")  # fmt: skip
            before = entry.fields
            try:
                fields = check_fields(body.get("fields", {}), before)
            except ValueError as error:
                raise HTTPException(422, str(error)) from None
            edited = changes(fields, entry.machine)
            catalog.update(entry_id, append_review(catalog.folder, entry.path, edited, body.get("approved", False)))
            changed = changes(fields, before)
            warnings = []
            try:
                written = write_sidecar_changes(entry.song(), changed)
            except OSError as error:  # the review itself is saved; say what could not follow it
                written, warnings = [], [f"the sidecars were not updated: {error}"]
            following = dataset_files.add(entry.song(), changed)
        return {**_detail(entry), "written": [str(p) for p in written], "following": following, "warnings": warnings}

    @app.get("/api/songs/{entry_id}/audio")
    def audio(entry_id: int) -> FileResponse:
        path = entry_of(entry_id).audio
        if not path.is_file():
            raise HTTPException(404, f"{path.name}: the file is no longer there")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(str(path), media_type=kind)  # answers Range requests: the player can seek

    @app.get("/api/songs/{entry_id}/image")
    def image(entry_id: int) -> Response:
        path = entry_of(entry_id).audio
        try:
            stat = path.stat()
        except OSError:
            raise HTTPException(404, f"{path.name}: the file is no longer there") from None
        key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{IMAGE_SIZE}".encode()).hexdigest()
        cached = catalog.folder / CACHE / f"{key}.png"
        with drawing:  # one picture at a time: bounded memory; matplotlib is not thread-safe
            if not cached.is_file():
                try:
                    atomic_write(cached, render_image(path))
                except AudioError as error:
                    raise HTTPException(422, f"{path.name}: {error}") from None
        return Response(cached.read_bytes(), media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _server(app: FastAPI):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


def _address(host: str, sock: socket.socket, token: str | None) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")


def _setup(folder: Path, host: str, api_key: str | None) -> tuple[Catalog, FastAPI, str | None]:
    started = time.perf_counter()
    catalog = Catalog(Path(folder))
    if not len(catalog):
        raise ValueError(f"{folder}: no annotate records here (annotations.jsonl); run acecap annotate first")
    log.info("%d files indexed in %.1f s", len(catalog), time.perf_counter() - started)
    loopback = is_loopback(host)
    token = api_key or (None if loopback else secrets.token_urlsafe(24))
    return catalog, create_app(catalog, token, loopback), token


def review(folder: Path, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
           open_browser: bool = False) -> None:  # fmt: skip
    """Serve the review app until Ctrl-C. Off a loopback address a token is required: `api_key`, or a new
    one, printed in the URL."""
    catalog, app, token = _setup(folder, host, api_key)
    sock = _bind(host, port)
    url = _address(host, sock, token)
    print(f"acecap review: {len(catalog)} files of {folder} on {url} (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, (url,)).start()
    server = _server(app)
    server.run(sockets=[sock])
    if server.should_exit:  # a signal stopped it; uvicorn's re-raise of it can be lost on a loaded machine
        raise KeyboardInterrupt


@contextmanager
def running(folder: Path, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> Iterator[str]:
    """Serve the review app in a background thread for the `with` block; yields its URL (with the token)."""
    _, app, token = _setup(folder, host, api_key)
    sock = _bind(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="acecap-review", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the review server failed to start (see the log)")
        time.sleep(0.01)
    try:
        yield _address(host, sock, token)
    finally:
        server.should_exit = True
        thread.join()
