"""The OpenAI chat-completions shape for `acecap serve`: a request's audio, prompt and settings in, the
completion (or its streamed chunks) out, and every refusal as an error with a status and a reason.

Audio comes as vLLM accepts it: an `input_audio` part (base64 data) or an `audio_url` part (a data: URL,
a file:// URL inside the folder the server allows, or an http(s) URL when the server allows them).
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .audio import AudioError, Clip, decode_audio, load_audio
from .captioner import Result
from .generate import Decoding


class APIError(Exception):
    """A request the server refuses or could not answer: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class AudioAccess:
    """Where audio may come from besides the request itself."""

    files: Path | None = None  # file:// URLs inside this folder (symlinks resolved) may be read
    urls: bool = False  # http(s) URLs may be fetched
    max_bytes: int = 100 * 2**20  # the most a fetched file may hold

    def __post_init__(self) -> None:
        if self.files is not None:
            object.__setattr__(self, "files", Path(self.files).resolve())


@dataclass(frozen=True)
class ChatRequest:
    """What a chat-completions request asks for, checked."""

    model: str | None
    audio: tuple[str, str]  # ("data", base64 text) or ("url", URL)
    prompt: str | None  # the text parts joined; None: the task's own prompt
    decoding: Decoding
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _number(body: dict, name: str, kind: type, default, low=None, high=None, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise APIError(400, f"{name} must be in {bounds}, got {value}", param=name)
    return kind(value)


def _parts(messages) -> tuple[list[str], list[dict]]:
    """The text parts and audio parts of the conversation's user messages."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    texts, audio = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise APIError(400, "each message must be an object with a role and content", param="messages")
        if message.get("role") != "user":
            raise APIError(400, f"only user messages are taken (got role {message.get('role')!r}): the model "
                           "answers one user turn, with its own system prompt", param="messages")  # fmt: skip
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise APIError(400, "message content must be a string or a list of parts", param="messages")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("input_audio", "audio_url") and isinstance(part.get(kind), dict):
                audio.append(part)
            else:
                raise APIError(400, f"content part {kind!r} is not supported: use text, input_audio or audio_url "
                               "(each with its object)", param="messages")  # fmt: skip
    return texts, audio


def parse_chat(body, max_new_tokens: int) -> ChatRequest:
    """Check a decoded JSON body; `max_new_tokens` is the server's default and cap for max_tokens."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    texts, audio = _parts(body.get("messages"))
    if len(audio) != 1:
        raise APIError(400, f"expected exactly one audio part (input_audio or audio_url), got {len(audio)}",
                       param="messages")  # fmt: skip
    part = audio[0]
    if part["type"] == "input_audio":
        data = part["input_audio"].get("data")
        if not isinstance(data, str):
            raise APIError(400, "input_audio.data must be base64 text", param="messages")
        source = ("data", data)
    else:
        url = part["audio_url"].get("url")
        if not isinstance(url, str):
            raise APIError(400, "audio_url.url must be a string", param="messages")
        source = ("url", url)
    if _number(body, "n", int, 1) != 1:
        raise APIError(400, "n must be 1: one caption per request", param="n")
    limit = _number(body, "max_completion_tokens", int, None, 1, max_new_tokens)
    limit = _number(body, "max_tokens", int, limit or max_new_tokens, 1, max_new_tokens)
    decoding = Decoding(
        max_new_tokens=limit,
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),  # greedy unless asked: labels repeat
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", float, 1.0, 0.0, None, low_open=True),
        seed=_number(body, "seed", int, None),
        ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM's extension: fixed-length runs for benchmarks
    )
    options = body.get("stream_options") or {}
    model = body.get("model")
    return ChatRequest(
        model=model if isinstance(model, str) else None,
        audio=source,
        prompt="\n".join(t for t in texts if t.strip()) or None,
        decoding=decoding,
        stream=bool(body.get("stream", False)),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage", False)),
    )


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64") from None


def _allowed_file(url: str, access: AudioAccess) -> Path:
    if access.files is None:
        raise APIError(403, "local files are off on this server (start it with --allow-files DIR)",
                       kind="permission_error")  # fmt: skip
    path = Path(unquote(urlparse(url).path))
    resolved = path.resolve()  # `..` and symlinks resolved before the check, so neither escapes the folder
    if not path.is_absolute() or not resolved.is_relative_to(access.files):
        raise APIError(403, f"{path} is outside the folder this server may read", kind="permission_error")
    return resolved


def _download(url: str, access: AudioAccess) -> bytes:
    if not access.urls:
        raise APIError(403, "remote URLs are off on this server (start it with --allow-urls)",
                       kind="permission_error")  # fmt: skip
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read(access.max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise APIError(400, f"could not fetch {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise APIError(400, f"could not fetch {url}: {getattr(error, 'reason', error)}") from None
    if len(data) > access.max_bytes:
        raise APIError(413, f"{url} holds more than {access.max_bytes / 2**20:g} MiB")
    return data


def fetch_audio(source: tuple[str, str], access: AudioAccess, max_seconds: float | None = None) -> Clip:
    """The request's audio as a clip of at most `max_seconds` (its duration still the whole audio's), blocking:
    reads, downloads and decodes."""
    kind, value = source
    try:
        if kind == "data":
            return decode_audio(_base64(value, "input_audio.data"), "input_audio", max_seconds)
        scheme = urlparse(value).scheme.lower()
        if scheme == "data":
            header, _, payload = value.partition(",")
            if not header.endswith(";base64"):
                raise APIError(400, "a data: audio_url must be base64 (data:audio/...;base64,...)")
            return decode_audio(_base64(payload, "the audio_url's data"), "audio_url", max_seconds)
        if scheme == "file":
            path = _allowed_file(value, access)
            return load_audio(path, max_seconds)
        if scheme in ("http", "https"):
            return decode_audio(_download(value, access), value, max_seconds)
    except AudioError as error:
        raise APIError(400, f"the audio could not be used: {error}") from None
    raise APIError(400, f"audio_url scheme {scheme!r} is not supported: use data:, file:// or http(s)://")


def usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.tokens,
        "total_tokens": result.prompt_tokens + result.tokens,
    }


def finish_reason(result: Result) -> str:
    return "stop" if result.finished else "length"


def completion(request_id: str, model: str, result: Result) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
    }


def chunk(request_id: str, model: str, delta: dict, finish: str | None = None, tokens: dict | None = None) -> dict:
    """One streamed piece; the usage-only chunk at the end has no choices, as OpenAI sends it."""
    choices = [] if tokens else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **({"usage": tokens} if tokens else {}),
    }
