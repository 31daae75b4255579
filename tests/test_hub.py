import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from acecap.hub import ModelNotFound, resolve_model


def test_local_folder_is_used_as_is(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def _resolve(model: str, hub: str, env: dict) -> subprocess.CompletedProcess:
    """resolve_model in a fresh process: the hub clients read their variables at import."""
    code = f"from acecap.hub import resolve_model; print(resolve_model({model!r}, {hub!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def _isolated(tmp_path) -> dict:
    return {"HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms")}


def test_offline_without_cache_gives_advice(tmp_path):
    result = _resolve("ACE-Step/acestep-captioner", "auto", {**_isolated(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "ACE-Step/acestep-captioner is in neither the ModelScope nor the Hugging Face cache" in result.stderr
    assert "--model /path/to/folder" in result.stderr


UNREACHABLE = {  # port 9 on localhost refuses connections: a real network failure, at once
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "MODELSCOPE_DOMAIN": "127.0.0.1:9",
    "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
}


def test_unreachable_hubs_fail_at_once_in_one_short_line(tmp_path):
    started = time.monotonic()
    result = _resolve("ACE-Step/acestep-captioner", "auto", {**_isolated(tmp_path), **UNREACHABLE})
    assert result.returncode != 0
    assert time.monotonic() - started < 30  # the hub clients' own retries took 25-45 s
    message = result.stderr.strip().splitlines()[-1]
    assert "acestep-captioner is not on this machine, and neither 127.0.0.1:9 nor 127.0.0.1:9 can be reached" in message
    assert "--model /path/to/folder" in message and "acecap.tiny" in message and "acecap doctor" in message
    assert "retry" not in result.stderr.lower()


@pytest.fixture
def hub_answering_404():
    """A real HTTP server that knows no repository, in place of huggingface.co."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_reachable_hub_that_fails_is_reported_in_a_sentence(tmp_path, hub_answering_404):
    env = {**_isolated(tmp_path), **UNREACHABLE, "HF_ENDPOINT": hub_answering_404}
    result = _resolve("ACE-Step/acestep-captioner", "auto", env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "could not download ACE-Step/acestep-captioner (huggingface: " in message
    assert "modelscope" not in message.split("; pass")[0]  # unreachable, so not tried
    assert len(message) < 600


def test_hugging_face_cache_is_found_offline(tmp_path, tiny_model):
    """A copy in the standard Hugging Face cache layout is used without the network."""
    cache = tmp_path / "hf" / "hub" / "models--ACE-Step--acestep-captioner"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tiny_model / "config.json").read_text())
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(revision)
    env = {**_isolated(tmp_path), "HF_HUB_OFFLINE": "1"}
    for hub in ("huggingface", "auto"):
        result = _resolve("ACE-Step/acestep-captioner", hub, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(snapshot)


def test_modelscope_cache_of_older_releases_is_found_offline(tmp_path, tiny_model):
    """ModelScope <= 1.37 (the seed used 1.33) kept models in MODELSCOPE_CACHE/models/<owner>/<name>."""
    folder = tmp_path / "ms" / "models" / "ACE-Step" / "acestep-captioner"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    for hub in ("modelscope", "auto"):
        result = _resolve("ACE-Step/acestep-captioner", hub, {**_isolated(tmp_path), "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(folder)
