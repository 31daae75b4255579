"""The OpenAI chat-completions shape for `acecap serve`: a request's audio, prompt and settings in, the
completion (or its streamed chunks) out, and every refusal as an error with a status and a reason.

Audio comes as vLLM accepts it: an `input_audio` part (base64 data) or an `audio_url` part (a data: URL,
a file:// URL inside the folder the server allows, or an http(s) URL when the server allows them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
class ChatRequest:
    """What a chat-completions request asks for, checked."""

    model: str | None
    audio: tuple[str, str]  # ("data", base64 text) or ("url", URL)
    prompt: str | None  # the text parts joined; None: the task's own prompt
    decoding: Decoding
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


SEEDS = (-(2**63), 2**63 - 1)  # what a torch generator takes, as vLLM bounds it
MIN_TEMPERATURE = 0.01  # smaller ones overflow the logits (vLLM raises them to this); 0 is greedy


def _shown(value, limit: int = 40) -> str:
    """A client's value quoted in an error, cut short: a 100 KB role or number is not echoed whole."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else f"an integer of {limit}+ digits"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(body: dict, name: str, kind: type, default, low=None, high=None, low_open: bool = False):
    """body[name] as an int (kind int) or a finite number (kind float) within the bounds, or `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"{name} must be {'a number' if kind is float else 'an integer'}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number, got {value}", param=name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else '∞'}]"
        raise APIError(400, f"{name} must be in {bounds}, got {_shown(value)}", param=name)
    return kind(value)


def _flag(body: dict, name: str) -> bool:
    """body[name] as a JSON boolean (absent or null: false); "false" as a string is refused, not taken as true."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {_shown(value)}", param=name)
    return value


def _unicode(text: str, what: str) -> str:
    """`text`, refused when JSON smuggled in a lone surrogate (\\ud800), which no tokenizer or URL can take."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise APIError(400, f"{what} is not valid Unicode (it holds a lone surrogate)", param="messages") from None
    return text


def _parts(messages) -> tuple[list[str], list[dict]]:
    """The text parts and audio parts of the conversation's user messages."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    texts, audio = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise APIError(400, "each message must be an object with a role and content", param="messages")
        if message.get("role") != "user":
            raise APIError(400, f"only user messages are taken (got role {_shown(message.get('role'))}): the model "
                           "answers one user turn, with its own system prompt", param="messages")  # fmt: skip
        content = message.get("content")
        if isinstance(content, str):
            texts.append(_unicode(content, "the message's text"))
            continue
        if not isinstance(content, list):
            raise APIError(400, "message content must be a string or a list of parts", param="messages")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(_unicode(part["text"], "the message's text"))
            elif kind in ("input_audio", "audio_url") and isinstance(part.get(kind), dict):
                audio.append(part)
            else:
                raise APIError(400, f"content part {_shown(kind)} is not supported: use text, input_audio or audio_url "
                               "(each with its object)", param="messages")  # fmt: skip
    return texts, audio


# OpenAI settings that would change the answer and that acecap does not implement: refused unless neutral,
# rather than ignored (others, such as user or metadata, change nothing and are ignored).
NOT_IMPLEMENTED = {"stop": (None, "", []), "logprobs": (None, False), "top_logprobs": (None, 0),
                   "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                   "tools": (None, []), "response_format": (None, {"type": "text"})}  # fmt: skip


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
        source = ("url", _unicode(url, "audio_url.url"))
    if _number(body, "n", int, 1) != 1:
        raise APIError(400, "n must be 1: one caption per request", param="n")
    for name, neutral in NOT_IMPLEMENTED.items():
        if body.get(name) not in neutral:
            raise APIError(400, f"{name} is not supported here: leave it out", param=name)
    limit = _number(body, "max_completion_tokens", int, None, 1, max_new_tokens)
    limit = _number(body, "max_tokens", int, limit or max_new_tokens, 1, max_new_tokens)
    temperature = _number(body, "temperature", float, 0.0, 0.0, 2.0)  # greedy unless asked: labels repeat
    if 0 < temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {temperature}",
                       param="temperature")  # fmt: skip
    decoding = Decoding(
        max_new_tokens=limit,
        temperature=temperature,
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", float, 1.0, 0.01, 100.0),
        seed=_number(body, "seed", int, None, *SEEDS),
        ignore_eos=_flag(body, "ignore_eos"),  # vLLM's extension: fixed-length runs for benchmarks
    )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    return ChatRequest(
        model=model,
        audio=source,
        prompt="\n".join(t for t in texts if t.strip()) or None,
        decoding=decoding,
        stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage"),
    )


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
