"""acecap annotate --ray: a real local Ray cluster on this machine, CPU actors, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import soundfile
from conftest import RATE, tone

from acecap.annotate import Job, annotate
from acecap.cluster import actor_count, cluster_kind
from acecap.generate import Decoding
from acecap.records import load_records

FIELDS = ("path", "caption", "tokens", "finished", "error", "duration", "truncated")


def songs(folder: Path, count: int) -> Path:
    folder.mkdir()
    for n in range(count):
        soundfile.write(folder / f"song{n:02d}.wav", tone(1.0 + n % 3, frequency=220.0 * (1 + n % 5)), RATE)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav")
    return folder


def records(folder: Path) -> dict[str, tuple]:
    lines = (folder / "annotations.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len({r["path"] for r in rows}) == len(rows), "a file was recorded twice"
    return {Path(r["path"]).name: tuple(r.get(f) for f in FIELDS[1:]) for r in rows}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a real local cluster: 2 CPU slots
    yield
    ray.shutdown()


def job(inputs: Path, output: Path, tiny_model: Path, **options) -> Job:
    settings = {"batch_size": 2, "decoding": Decoding(max_new_tokens=6), **options}
    return Job(inputs=[str(inputs)], output_dir=output, model=str(tiny_model), devices=["cpu"], **settings)


def test_the_kind_and_number_of_actors_follow_the_cluster():
    assert cluster_kind("auto", {"CPU": 8, "NPU": 8}) == "npu"
    assert cluster_kind("auto", {"CPU": 8, "GPU": 4}) == "cuda"
    assert cluster_kind("auto", {"CPU": 8}) == "cpu"
    assert cluster_kind("cuda:1", {"GPU": 4}) == "cuda"  # Ray picks the card; the kind is what counts
    with pytest.raises(ValueError, match="use npu, cuda, cpu or auto"):
        cluster_kind("mps", {})
    assert actor_count("npu", {"NPU": 16.0}, None) == 16 and actor_count("cpu", {"CPU": 64}, None) == 1
    assert actor_count("cuda", {"GPU": 4}, 2) == 2
    with pytest.raises(ValueError, match="no CUDA resource"):
        actor_count("cuda", {"CPU": 4}, None)


@pytest.mark.slow
def test_ray_run_gives_the_records_of_a_local_run(cluster, tiny_model, tmp_path, monkeypatch):
    inputs = songs(tmp_path / "in", 6)
    local = annotate(job(inputs, tmp_path / "local", tiny_model), progress=False)
    monkeypatch.chdir(tmp_path)  # paths relative to here: the actors run in the folder Ray started in
    on_ray = annotate(job(Path("in"), Path("ray"), tiny_model, ray="auto", ray_actors=2), progress=False)
    assert records(tmp_path / "ray") == records(tmp_path / "local")
    assert (on_ray.captioned, len(on_ray.failures)) == (local.captioned, len(local.failures)) == (6, 1)
    assert "broken.wav" in on_ray.failures[0][0]
    assert len(on_ray.per_device) == 2 and sum(s["files"] for s in on_ray.per_device.values()) == 7
    assert all("pid" in s["device"] for s in on_ray.per_device.values())


def actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::Annotator"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


@pytest.mark.slow
def test_a_killed_actor_costs_only_its_chunk_and_every_file_is_recorded_once(cluster, tiny_model, tmp_path):
    inputs = songs(tmp_path / "in", 12)
    output = tmp_path / "out"
    slow = job(inputs, output, tiny_model, ray="auto", ray_actors=2, decoding=Decoding(max_new_tokens=120,
               ignore_eos=True))  # fmt: skip
    done = {}
    runner = threading.Thread(target=lambda: done.update(summary=annotate(slow, progress=False)))
    runner.start()
    deadline = time.monotonic() + 120
    while not list(output.glob("annotations.part-*.jsonl")) or not load_records(output):
        assert time.monotonic() < deadline and runner.is_alive(), "no records came back"
        time.sleep(0.05)
    killed = actor_pids()[0]
    os.kill(killed, signal.SIGKILL)
    runner.join(timeout=300)
    summary = done["summary"]
    assert killed not in actor_pids()
    assert summary.captioned == 12 and [Path(p).name for p, _ in summary.failures] == ["broken.wav"]
    assert summary.not_processed == 0
    assert sorted(records(output)) == sorted([f"song{n:02d}.wav" for n in range(12)] + ["broken.wav"])


@pytest.mark.slow
def test_an_interrupted_ray_run_resumes_without_redoing_finished_files(tiny_model, tmp_path):
    inputs = songs(tmp_path / "in", 10)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "acecap", "annotate", str(inputs), "-o", str(output), "--model", str(tiny_model),
               "--device", "cpu", "--ray", "--ray-actors", "1", "--batch-size", "2", "--max-new-tokens", "60",
               "--quiet"]  # fmt: skip
    first = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while len(load_records(output)) < 2:
        assert time.monotonic() < deadline and first.poll() is None, "no records came back"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its local cluster, mid-run
    first.wait()
    finished = {r["path"] for r in load_records(output) if not r["error"]}  # failures are retried on resume
    assert 1 <= len(finished) < 10
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr  # 1: broken.wav failed, as in a local run
    assert f"({len(finished)} done earlier)" in second.stderr
    assert len(records(output)) == 11
