"""Fuzzing the request validator of a real acecap serve (uvicorn on localhost, the tiny model) with
hypothesis: arbitrary bytes, arbitrary JSON and mutations of a valid request. Every answer must be a 200
(a completion, or a stream without an error in it) or a 4xx in OpenAI's error shape; never a 5xx."""

from __future__ import annotations

import base64
import copy
import json
import struct

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import PROMPT, wav_bytes

from acecap import Captioner
from acecap.fetch import AudioAccess
from acecap.serve import ServeConfig, running

NAME = "fuzzed"
VALID = {
    "model": NAME,
    "max_tokens": 2,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(wav_bytes(0.05)).decode(), "format": "wav"},
                },  # fmt: skip
            ],
        }
    ],
}
OPTIONS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stream",
           "stream_options", "ignore_eos", "repetition_penalty", "messages"]  # fmt: skip
EDGES = [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1, 10**40, 1e-300, 0, -1, 0.5, 2.0001, True,
         "false", "", "<|AUDIO|>", "<|im_end|>", "\ud800", "x" * 70_000, [], {}, None,
         "data:audio/wav;base64,", "data:,x", "file:///etc/passwd", "file:///%00", "http://2130706433/",
         "http://[::1", "http://127.0.0.1:99999/", "http://user:pw@[::ffff:10.0.0.1]/", "http://a..b/", "http:///x",
         "https://10.0.0.1/\ud800", "gopher://x", "http://0x7f.1/a b"]  # fmt: skip
# Only addresses refused before any connection: a public one would wait on a network this test may not have.
SETTINGS = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(EDGES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
values = st.sampled_from(EDGES) | json_values  # half the time a value known to have broken servers


def paths(value, here=()):
    """Every place in a JSON value: the key or index path to each container member."""
    members = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, member in members:
        yield here + (key,)
        yield from paths(member, here + (key,))


@st.composite
def mutated(draw) -> dict:
    """The valid request with one to three members replaced, removed or added."""
    request = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["add option", "add option", "replace", "remove", "add member"]))
        if action == "add option":
            request[draw(st.sampled_from(OPTIONS))] = draw(values)
            continue
        found = list(paths(request))
        if not found:
            break
        *parent_path, key = draw(st.sampled_from(found))
        parent = request
        for step in parent_path:
            parent = parent[step]
        if action == "replace":
            parent[key] = draw(values)
        elif action == "remove":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(values)
        else:
            parent.insert(key, draw(values))
    return request


@pytest.fixture(scope="module")
def server(tiny_model):
    captioner = Captioner.from_pretrained(tiny_model, device="cpu")
    access = AudioAccess(urls=True, timeout_s=5)
    config = ServeConfig(served_model_name=(NAME,), max_new_tokens=4, max_duration=5, max_body_mb=1, access=access)
    with running(captioner, config) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def check(client: httpx.Client, content: bytes) -> None:
    answer = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    status = answer.status_code
    assert status == 200 or 400 <= status < 500, (status, answer.text[:500], content[:500])
    if status != 200:
        assert answer.headers["content-type"] == "application/json"
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
        return
    if answer.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("error" not in json.loads(event) for event in events[:-1]), answer.text
    else:
        reply = answer.json()
        assert reply["object"] == "chat.completion" and reply["model"] == NAME
        assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] <= 32768


def test_the_valid_request_is_answered(server):
    check(server, json.dumps(VALID).encode())


@settings(SETTINGS, max_examples=150)
@given(request=mutated())
def test_mutations_of_a_valid_request_get_200_or_a_4xx_in_the_openai_shape(server, request):
    check(server, json.dumps(request).encode())


@settings(SETTINGS, max_examples=60)
@given(value=json_values)
def test_arbitrary_json_gets_a_4xx_in_the_openai_shape(server, value):
    check(server, json.dumps(value).encode())


@settings(SETTINGS, max_examples=40)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_get_a_4xx_in_the_openai_shape(server, data):
    check(server, data)


@st.composite
def wav_files(draw) -> bytes:
    """A WAV header with any format, channels, rate and sizes, over a few bytes of data (a few, so that a
    header claiming 1 Hz cannot make a decoder allocate gigabytes here)."""
    data = draw(st.binary(max_size=64))
    short, long = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)
    tag = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE]) | short)
    rate = draw(st.sampled_from([1, 8000, 44100, 2**31 - 1]) | long)
    bits = draw(st.sampled_from([8, 16, 24, 32, 64]) | short)
    fmt = struct.pack("<HHIIHH", tag, draw(short), rate, draw(long), draw(short), bits)
    size = draw(st.just(len(data)) | st.integers(0, 2**32 - 1))
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", draw(st.just(4 + len(chunks)) | st.integers(0, 2**32 - 1))) + b"WAVE" + chunks


@settings(SETTINGS, max_examples=60)
@given(audio=wav_files())
def test_malformed_wav_files_get_a_4xx_in_the_openai_shape(server, audio):
    request = copy.deepcopy(VALID)
    request["messages"][0]["content"][1]["input_audio"]["data"] = base64.b64encode(audio).decode()
    check(server, json.dumps(request).encode())
