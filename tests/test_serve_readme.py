"""The README's serve examples, taken from the README itself so they cannot drift: each way it starts the
server (by hub id, and a local folder with --served-model-name), then its curl + jq request and its openai
client code, unchanged but for the port, the device and a tiny model in place of the real one."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

README = Path(__file__).resolve().parent.parent / "README.md"


def serve_section() -> str:
    text = README.read_text()
    start = text.index("### `acecap serve`")
    return text[start : text.index("\n### ", start + 1)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", serve_section(), re.S)


def start_commands() -> list[str]:
    """The README's `acecap serve ...` lines, comments dropped."""
    return [line.split("#")[0].strip() for line in blocks("bash")[0].splitlines() if line.startswith("acecap serve")]


def mp3(path: Path) -> None:
    t = np.arange(3 * 44100) / 44100
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100, format="MP3")
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def user_folder(tmp_path, tiny_model) -> tuple[Path, dict]:
    """A working folder with song.mp3 and ./acestep-captioner, and the tiny model also in a Hugging Face
    cache as ACE-Step/acestep-captioner, found offline; its environment."""
    mp3(tmp_path / "song.mp3")
    (tmp_path / "acestep-captioner").symlink_to(tiny_model)
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub" / "models--ACE-Step--acestep-captioner"
    (cache / "snapshots" / revision).mkdir(parents=True)
    for item in tiny_model.iterdir():
        (cache / "snapshots" / revision / item.name).symlink_to(item)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms"),
           "HF_HUB_OFFLINE": "1", "KEY": "readme-key"}  # fmt: skip
    return tmp_path, env


def test_the_readme_starts_the_server_by_hub_id_and_by_local_folder():
    commands = start_commands()
    assert len(commands) == 2 and "--model" not in commands[0]
    assert "--model ./acestep-captioner --served-model-name ACE-Step/acestep-captioner" in commands[1]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the README's example needs curl and jq")
@pytest.mark.parametrize("which", ["hub id", "local folder"])
def test_the_readme_examples_work_as_written(user_folder, which):
    folder, env = user_folder
    command = start_commands()[0 if which == "hub id" else 1]
    # This machine: the CPU, any free port, localhost only.
    command = command.replace("--device npu:0", "").replace("--host 0.0.0.0", "").replace("--port 8000", "")
    command = command.replace("acecap serve", f"{sys.executable} -m acecap serve --device cpu --port 0", 1)
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=folder, env=env, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        for line in server.stderr:
            if "serving" in line:
                port = line.split(" on ")[-1].split("/v1")[0].rsplit(":", 1)[1]
                break
        else:
            pytest.fail("the server never said where it listens")
        script, curl = blocks("bash")[1].split("\nPY\n", 1)
        script = script.replace("python - <<", f"{sys.executable} - <<") + "\nPY\n"
        subprocess.run(["bash", "-c", script], cwd=folder, env=env, check=True)
        assert (folder / "request.json").stat().st_size > 10_000  # the song, in base64
        curl = curl.replace("localhost:8000", f"127.0.0.1:{port}")
        caption = subprocess.run(["bash", "-c", curl], cwd=folder, env=env, capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        assert caption and caption != "null"  # jq finds the caption: the served name matched

        client = blocks("python")[0].replace("http://localhost:8000/v1", f"http://127.0.0.1:{port}/v1")
        program = f"import os\nKEY = os.environ['KEY']\n{client}"
        printed = subprocess.run([sys.executable, "-c", program], cwd=folder, env=env, capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.startswith(caption) and "CompletionUsage(" in printed.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
