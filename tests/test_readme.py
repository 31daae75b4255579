"""The README's `acecap` commands, taken from the README itself so they cannot drift: every one parses with
acecap's own parser, and every one a CPU host can run without a download is run as written, in a folder of
real songs, with the tiny model standing in for the released ones in an offline hub cache. The one change:
each generates 8 tokens (bench: one batch size, one repeat), so random weights spend no minutes on noise."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import soundfile
from conftest import encode_with_pyav, offline_hub, tone

from acecap.catalog import Catalog
from acecap.cli import build_parser
from acecap.review import running

README = Path(__file__).resolve().parent.parent / "README.md"
# What a CPU host without a network cannot run: other devices, a Ray cluster, pip, and the servers
# (`serve` has its own README test, `review` without --export serves until Ctrl-C).
ELSEWHERE = re.compile(r"cuda|npu|--ray|/nfs|^acecap serve|^acecap review \S+$|captioner-int4")


def readme_commands() -> list[str]:
    """Each `acecap …` line of the README's bash blocks, its comment dropped, in the README's order, once."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            if command.startswith("acecap ") and command not in lines:
                lines.append(command)
    return lines


def runs_here(command: str) -> bool:
    return not ELSEWHERE.search(command)


def test_the_readme_has_the_examples_this_file_runs():
    commands = readme_commands()
    assert len(commands) >= 20
    here = [c for c in commands if runs_here(c)]
    assert any(c.startswith("acecap annotate") for c in here) and any(c.startswith("acecap compare") for c in here)
    assert any("--export" in c for c in here) and any(c.startswith("acecap bench") for c in here)


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    argv = shlex.split(command.replace('"$KEY"', "readme-key"))[1:]
    args = build_parser().parse_args(argv)  # argparse exits (failing the test) on any option it does not know
    assert args.command == argv[0]


@pytest.fixture
def user_folder(tmp_path, tiny_model) -> tuple[Path, dict]:
    """songs/ (a wav, an mp3 in a subfolder), more/ and list.csv, ./acestep-captioner; both released models
    as the tiny one in an offline hub cache."""
    songs = tmp_path / "songs"
    (songs / "live").mkdir(parents=True)
    soundfile.write(songs / "rock.wav", tone(4.0, frequency=220.0), 44100)
    soundfile.write(songs / "live" / "waltz.mp3", tone(3.0, frequency=330.0), 44100)
    (tmp_path / "more").mkdir()
    encode_with_pyav(tmp_path / "more" / "intro.m4a", tone(2.0), 44100, "aac")
    soundfile.write(tmp_path / "listed.flac", tone(2.0, frequency=550.0), 44100)
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "note"], ["listed.flac", "from the manifest"]])
    (tmp_path / "acestep-captioner").symlink_to(tiny_model)
    env = offline_hub(tmp_path, tiny_model, ["ACE-Step/acestep-captioner", "ACE-Step/acestep-transcriber"])
    return tmp_path, env


def run_as_written(command: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(command)[1:]
    argv += ["--tokens", "8", "--batch-sizes", "1", "--repeats", "1"] if argv[0] == "bench" else []
    argv += ["--max-new-tokens", "8"] if argv[0] in ("annotate", "caption", "compare") else []
    return subprocess.run([sys.executable, "-m", "acecap", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "annotations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_readme_commands_run_as_written_on_a_cpu(user_folder):
    folder, env = user_folder
    ran = []
    for command in [c for c in readme_commands() if runs_here(c)]:
        if command.startswith("acecap compare laptop/"):  # the two saved runs it compares, made as the README says
            for side in ("laptop", "server"):
                made = run_as_written(f"acecap annotate songs/ -o {side}", folder, env)
                assert made.returncode == 0, made.stderr
        if command.startswith("acecap review labels --export approved"):
            with running(folder / "labels") as url, httpx.Client(base_url=url) as client:
                song = next(e.id for e in Catalog(folder / "labels").entries if e.shown.endswith("waltz.mp3"))
                assert client.post(f"/api/songs/{song}/review", json={"fields": {}, "approved": True}).is_success
        result = run_as_written(command, folder, env)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        ran.append(command)

        words = command.split()
        if words[1] == "annotate":
            done = {(Path(r["path"]).name, r["task"]) for r in records(folder / "labels") if not r.get("error")}
            assert ("rock.wav", "caption") in done or "--shard" in command
        if "-f txt" in command:
            assert (folder / "labels" / "rock.caption.txt").read_text().strip()
        if "--devices all" in command:
            assert {"intro.m4a", "listed.flac"} <= {Path(r["path"]).name for r in records(folder / "labels")}
        if "--tasks caption,lyrics,meta -f acestep" in command:
            sidecar = json.loads((folder / "songs" / "live" / "waltz.json").read_text())
            assert {"caption", "bpm", "keyscale", "timesignature", "language", "is_instrumental"} <= sidecar.keys()
            assert (folder / "songs" / "live" / "waltz.lyrics.txt").is_file()
        if words[1] == "compare":
            assert "report" in result.stdout + result.stderr
        if "-f acestep-dataset" in command:
            dataset = json.loads((folder / "labels" / "dataset.json").read_text())
            assert [s["filename"] for s in dataset["samples"]] == ["waltz.mp3"]
        if "--export-to lora/" in command:
            assert [row["File"] for row in csv.DictReader((folder / "lora" / "dataset.csv").open())][0].endswith(
                "waltz.mp3"
            )
        if words[1] == "bench":
            assert (folder / "bench" / "bench.json").is_file()
    assert len(ran) >= 10, ran
