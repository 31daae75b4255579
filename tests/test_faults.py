"""Fault and abuse cases, end to end: real files that poison a run, real signals, real kill -9, real peak memory
of real processes. Each runs the command line in its own process, as a user would."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from conftest import pcm_wav, run_acecap, tone

from acecap.records import ANNOTATIONS, load_records

ACECAP = [sys.executable, "-m", "acecap"]
LATIN1 = os.fsdecode(b"latin1_\xe9\xff.wav")  # not UTF-8: Python holds \xe9\xff as lone surrogates
LONG_NAME = "n" * 236 + ".wav"  # 240 characters; OUT/<name>.caption.txt is 248, under the 255 limit
LONGER_NAME = "m" * 248 + ".wav"  # its sidecar's name would be 260: that file fails, alone


def as_a_user() -> list[str]:
    """A prefix that makes file permissions bind: root reads and writes anything (CAP_DAC_OVERRIDE) unless
    the capability is dropped, which setpriv does for the command it starts."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to bind")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def write_song(path: Path, seconds: float = 1.0, frequency: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(os.fsencode(path), tone(seconds, 16000, frequency), 16000)  # bytes: any name
    return path


def songs(folder: Path, count: int, seconds: float = 1.0) -> list[Path]:
    return [write_song(folder / f"song{i:02d}.wav", seconds, 200.0 + 15 * i) for i in range(count)]


def records_of(folder: Path) -> list[dict]:
    """The merged records, each path absolute (load_records resolves their roots)."""
    assert not list(folder.glob("annotations.part-*"))
    return load_records(folder)


def annotate_command(inputs: Path, output: Path, model: Path, *options: str) -> list[str]:
    return [*ACECAP, "annotate", str(inputs), "-o", str(output), "--model", str(model), "--quiet", *options]


def poison_folder(folder: Path) -> dict[str, str]:
    """Good songs (one with a non-UTF-8 name, one with a 240-character name) among files that each once
    stopped a whole run; the part of the reason each bad one's record must give."""
    for name in ("good.wav", LATIN1, LONG_NAME):
        write_song(folder / name)
    write_song(folder / LONGER_NAME)
    pcm_wav(folder / "one-sample.wav", np.array([0.3]), 44100)  # nothing at all once resampled to 16 kHz
    pcm_wav(folder / "huge-rate.wav", np.full(10, 0.3), 2**31 - 1)
    pcm_wav(folder / "short.wav", tone(0.01), 44100, declared_frames=3 * 44100)  # 3 s declared, 10 ms held
    (folder / "loop-a.wav").symlink_to(folder / "loop-b.wav")
    (folder / "loop-b.wav").symlink_to(folder / "loop-a.wav")
    write_song(folder / "locked" / "inside.wav")
    (folder / "locked").chmod(0)
    return {
        "one-sample.wav": "no samples at all at 16000 Hz",
        "huge-rate.wav": "no samples at all at 16000 Hz",
        "short.wav": "holds 0.01 s of the 3.00 s its header declares",
        "loop-a.wav": "symlink loop",
        "loop-b.wav": "symlink loop",
        "locked": "cannot list this folder: Permission denied",
        LONGER_NAME: "cannot write its .caption.txt: File name too long",
    }


@pytest.fixture
def poison(tmp_path):
    expected = poison_folder(tmp_path / "in")
    yield tmp_path / "in", expected
    (tmp_path / "in" / "locked").chmod(0o755)  # so pytest can clean up


@pytest.mark.slow
def test_no_file_stops_annotate_and_a_rerun_retries_every_failure(tiny_model, tmp_path, poison):
    folder, expected = poison
    command = as_a_user() + annotate_command(folder, tmp_path / "out", tiny_model, "--max-new-tokens", "4", "-f", "txt")
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr and "not processed" not in first.stderr
    (tmp_path / "out" / ANNOTATIONS).read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
    by_name = {Path(r["path"]).name: r for r in records_of(tmp_path / "out")}
    assert set(by_name) == {"good.wav", LATIN1, LONG_NAME, *expected}
    for name, reason in expected.items():
        assert reason in (by_name[name]["error"] or ""), (name, by_name[name]["error"])
    for name in ("good.wav", LATIN1, LONG_NAME):
        record = by_name[name]
        assert record["error"] is None and record["caption"], record
        assert record["path"] == os.path.abspath(folder / name)  # the exact name, bytes and all
        sidecar = tmp_path / "out" / Path(name).with_suffix(".caption.txt")
        assert sidecar.read_text(encoding="utf-8") == record["caption"] + "\n"
    assert f"failed         {len(expected)}" in first.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "files          10 (3 done earlier)" in again.stderr, again.stderr
    assert f"failed         {len(expected)}" in again.stderr  # each failure tried again, none skipped


@pytest.mark.slow
def test_allow_partial_captions_what_a_cut_file_holds_and_flags_it(tiny_model, tmp_path):
    pcm_wav(tmp_path / "in" / "short.wav", tone(1.0), 44100, declared_frames=3 * 44100)
    result = run_acecap("annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--max-new-tokens", "4", "--quiet", "--allow-partial")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (record,) = records_of(tmp_path / "out")
    assert record["error"] is None and record["caption"] and record["duration"] == 1.0
    assert record["partial"] == "holds 1.00 s of the 3.00 s its header declares"
    assert "  partial      1: shorter than its header says" in result.stderr  # counted, not passed as whole


@pytest.mark.slow
def test_caption_goes_past_bad_files_and_exits_1(tiny_model, tmp_path):
    good = write_song(tmp_path / "good.wav")
    latin1 = write_song(tmp_path / LATIN1, frequency=330.0)
    nothing = pcm_wav(tmp_path / "one-sample.wav", np.array([0.3]), 44100)
    locked = write_song(tmp_path / "locked.wav")
    locked.chmod(0)
    last = write_song(tmp_path / "last.wav", frequency=550.0)
    command = as_a_user() + ACECAP + ["caption", *map(str, (good, latin1, nothing, locked, last)), "--model",
                                      str(tiny_model), "--max-new-tokens", "4", "-o", str(tmp_path / "out"), "-f",
                                      "json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=600)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"# {tmp_path}/latin1_\\xe9\\xff.wav" in stdout  # shown with its bytes, never a crash
    assert stdout.count("# ") == 3 and "no samples at all" in stderr and "Permission denied" in stderr
    written = {p.name: p for p in (tmp_path / "out").iterdir()}
    assert set(written) == {"good.caption.json", "last.caption.json", f"{Path(LATIN1).stem}.caption.json"}
    saved = json.loads(written[f"{Path(LATIN1).stem}.caption.json"].read_bytes().decode("utf-8"))
    assert saved["source"] == str(latin1)


@pytest.mark.slow
def test_kill_9_never_leaves_a_record_without_its_sidecar(tiny_model, tmp_path):
    songs(tmp_path / "in", 48)
    output = tmp_path / "out"
    command = annotate_command(tmp_path / "in", output, tiny_model, "--max-new-tokens", "6", "--batch-size", "2",
                               "-f", "txt")  # fmt: skip
    rng = random.Random(5)
    for _ in range(3):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = len(load_records(output)) if (output / ANNOTATIONS).exists() else 0
        target = done + rng.randint(1, 12)
        deadline = time.monotonic() + 300
        while len(load_records(output)) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # as the part file grows
        process.send_signal(signal.SIGKILL)
        process.wait()
        for record in load_records(output):
            sidecar = output / Path(record["path"]).with_suffix(".caption.txt").name
            assert sidecar.read_text() == record["caption"] + "\n", record["path"]
    final = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    records = records_of(output)
    assert len(records) == 48
    assert all((output / Path(r["path"]).with_suffix(".caption.txt").name).is_file() for r in records)


def part_lines(folder: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in folder.glob("annotations.part-*.jsonl"))


def wait_for_records(folder: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while part_lines(folder) < count:
        assert process.poll() is None, "the run ended before it was interrupted"
        assert time.monotonic() < deadline, "no records in time"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("presses", "devices"), [(1, "cpu"), (2, "cpu"), (1, "cpu,cpu")])  # cpu,cpu: 2 processes
def test_ctrl_c_stops_after_or_drops_the_batch_merges_and_exits_130(tiny_model, tmp_path, presses, devices):
    songs(tmp_path / "in", 40, seconds=2.0)
    output = tmp_path / "out"
    command = annotate_command(tmp_path / "in", output, tiny_model, "--max-new-tokens", "24", "--batch-size", "2",
                               "--devices", devices)  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(output, 2, process)
    for _ in range(presses):
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert "stopping after the batch in flight" in stderr and "interrupted" in stderr
    records = records_of(output)  # merged: one file, whole records, no part files left
    assert 2 <= len(records) < 40 and all(r["error"] is None for r in records)
    assert not list(output.glob("annotations.part-*"))
    rest = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rest.returncode == 0 and f"({len(records)} done earlier)" in rest.stderr, rest.stderr
    assert len(records_of(output)) == 40


def worker_processes(parent: int) -> list[int]:
    """The spawned workers of `parent` (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_die_with_the_main_process(tiny_model, tmp_path):
    songs(tmp_path / "in", 60, seconds=2.0)
    output = tmp_path / "out"
    # Enough work that one worker cannot finish the job while the other is still starting on a loaded machine.
    command = annotate_command(tmp_path / "in", output, tiny_model, "--max-new-tokens", "300", "--batch-size", "1",
                               "--devices", "cpu,cpu")  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_records(output, 2, process)
    deadline = time.monotonic() + 120  # on a loaded machine the second worker may still be starting
    while len(workers := worker_processes(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) == 2, f"job still running: {process.poll() is None}"
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, workers))
    written = part_lines(output)
    time.sleep(2)
    assert part_lines(output) == written  # nothing writes records any more


@pytest.mark.slow
def test_a_read_only_output_folder_fails_before_any_model_loads(tmp_path):
    write_song(tmp_path / "in" / "song.wav")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o555)
    missing = "nobody/no-such-model"  # a hub id, offline: were the model looked up first, this would be the error
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in (["annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                    ["caption", str(tmp_path / "in" / "song.wav"), "-o", str(tmp_path / "out")]):  # fmt: skip
        result = subprocess.run(as_a_user() + ACECAP + command + ["--model", missing], capture_output=True, text=True,
                                env=offline)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"cannot write to the output folder {tmp_path / 'out'}: Permission denied" in result.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_outputs_follow_the_umask_and_files_already_there_keep_their_mode(tiny_model, tmp_path):
    write_song(tmp_path / "songs" / "a.wav")
    write_song(tmp_path / "songs" / "b.wav", frequency=330.0)
    existing = tmp_path / "songs" / "a.json"
    existing.write_text('{"genre": "rock"}\n')
    existing.chmod(0o640)
    command = ACECAP + ["annotate", str(tmp_path / "songs"), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--max-new-tokens", "4", "--quiet", "-f", "txt", "-f", "acestep", "-f", "csv"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, umask=0o022)
    assert result.returncode == 0, result.stderr
    created = ("out/annotations.jsonl", "out/a.caption.txt", "out/dataset.csv", "songs/a.caption.txt", "songs/b.json")
    assert {path: mode(tmp_path / path) for path in created} == dict.fromkeys(created, 0o644)
    assert mode(existing) == 0o640 and json.loads(existing.read_text())["genre"] == "rock"
    (tmp_path / "out" / ANNOTATIONS).chmod(0o600)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, umask=0o022)
    assert again.returncode == 0 and mode(tmp_path / "out" / ANNOTATIONS) == 0o600, again.stderr
    captioned = subprocess.run(ACECAP + ["caption", str(tmp_path / "songs" / "a.wav"), "--model", str(tiny_model),
                                         "--max-new-tokens", "4", "-o", str(tmp_path / "cap"), "-f", "json"],
                               capture_output=True, text=True, timeout=600, umask=0o027)  # fmt: skip
    assert captioned.returncode == 0 and mode(tmp_path / "cap" / "a.caption.json") == 0o640, captioned.stderr


# ---- memory: a 40 KB file that declares 20,000 s ---------------------------------------------------


MB = 2**20


def one_hertz(path: Path) -> Path:
    """40 KB of 16-bit samples at 1 Hz: 20,000 s of audio, 1.28 GB once resampled whole to 16 kHz."""
    return pcm_wav(path, np.random.default_rng(0).uniform(-0.5, 0.5, 20_000), 1)


def peak_rss(command: list[str]) -> float:
    """The peak resident memory (MB) of a command run to its end, as the kernel counted it."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode in (0, 1), stderr.decode()[-2000:]
    return usage.ru_maxrss * 1024 / MB


@pytest.mark.slow
def test_a_small_file_declaring_20000_s_costs_what_a_song_captioned_as_long_costs(tiny_model, tmp_path):
    """Only the first --max-duration (300 s) is decoded, so the 40 KB file that declares 20,000 s costs what a
    300 s song costs (which is mostly the feature extractor's STFT of those 300 s): within 200 MB of it, in
    `caption` and in `annotate --tasks caption,meta`. Before, the file was decoded whole (1.28 GB at 16 kHz,
    several GB on the way; meta, which had no cap, ran out of memory)."""
    song = write_song(tmp_path / "song" / "song.wav", seconds=300.0)
    big = one_hertz(tmp_path / "big" / "declares-20000-s.wav")
    model = ["--model", str(tiny_model), "--max-new-tokens", "4"]
    peaks = {}
    for audio in (song, big):  # each in its own folder: annotate finds only it there
        peaks[audio.stem] = (
            peak_rss(ACECAP + ["caption", str(audio), *model]),
            peak_rss(ACECAP + ["annotate", str(audio.parent), "-o", str(tmp_path / f"out-{audio.stem}"),
                               "--tasks", "caption,meta", "--quiet", *model]),
        )  # fmt: skip
    (song_caption, song_annotate), (big_caption, big_annotate) = peaks[song.stem], peaks[big.stem]
    assert big_caption - song_caption < 200 and big_annotate - song_annotate < 200, peaks
    caption, meta = sorted(records_of(tmp_path / f"out-{big.stem}"), key=lambda r: r["task"])
    assert caption["duration"] == meta["duration"] == 20000.0 and caption["truncated"] and caption["long"]
    assert caption["captioned_seconds"] == 300.0 and meta["error"] is None and meta["timings"]["total_s"] > 0


def vm(pid: int, key: str) -> float:
    line = next(line for line in (Path("/proc") / str(pid) / "status").open() if line.startswith(key))
    return int(line.split()[1]) * 1024 / MB


@pytest.mark.slow
def test_serve_refuses_a_small_file_declaring_20000_s_without_decoding_it_whole(tiny_model, tmp_path):
    process = subprocess.Popen(
        ACECAP + ["serve", "--model", str(tiny_model), "--device", "cpu", "--port", "0", "--max-new-tokens", "4"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in process.stderr:
            if "serving" in line:
                url = line.split(" on ")[-1].split("/v1")[0]
                break
        else:
            pytest.fail("the server never said where it listens")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its pipe from filling

        def ask(path: Path) -> httpx.Response:
            data = base64.b64encode(path.read_bytes()).decode()
            part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
            body = {"messages": [{"role": "user", "content": [part]}]}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)

        assert ask(write_song(tmp_path / "song.wav", seconds=10.0)).status_code == 200
        idle = vm(process.pid, "VmHWM")
        for _ in range(4):
            refused = ask(one_hertz(tmp_path / "declares-20000-s.wav"))
            assert refused.status_code == 413 and "20000.0 s long" in refused.json()["error"]["message"]
        assert vm(process.pid, "VmHWM") - idle < 200
    finally:
        process.kill()
        process.wait()
