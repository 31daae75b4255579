import os
import subprocess
import sys

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


def test_unreachable_hubs_are_both_reported(tmp_path):
    # Port 9 on localhost refuses connections: a real network failure, quickly.
    env = {
        **_isolated(tmp_path),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "MODELSCOPE_DOMAIN": "127.0.0.1:9",
        "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
        "API_HTTP_CLIENT_MAX_RETRIES": "0",
    }
    result = _resolve("ACE-Step/acestep-captioner", "auto", env)
    assert result.returncode != 0
    assert "could not download ACE-Step/acestep-captioner (modelscope: " in result.stderr
    assert "; huggingface: " in result.stderr


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
