"""The input pipeline: real files, real worker processes, real signals."""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import RATE, pcm_wav, tone

from acecap.audio import load_audio
from acecap.inputs import Item
from acecap.pipeline import Pipeline, default_workers


def items(paths: list[Path]) -> list[Item]:
    return [Item(path, Path(path.name)) for path in paths]


def songs(folder: Path, count: int, seconds: float = 4.0) -> list[Path]:
    paths = []
    for n in range(count):
        stereo = np.stack([tone(seconds, frequency=220.0 * (1 + n)), tone(seconds, frequency=330.0)], axis=1)
        path = folder / f"song{n}.{'mp3' if n % 2 else 'flac'}"
        soundfile.write(path, stereo, RATE)
        paths.append(path)
    return paths


def endless(path: Path) -> Path:
    """A WAV of six hours of silence, sparse on disk: a decode that outlasts any test's patience (a FIFO,
    which would block for ever, is refused before it is opened)."""
    data = 6 * 3600 * RATE * 4  # 16-bit stereo
    header = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE" + b"fmt "
    header += struct.pack("<IHHIIHH", 16, 1, 2, RATE, RATE * 4, 4, 16) + b"data" + struct.pack("<I", data)
    with path.open("wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + data)
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_clips_come_back_as_load_audio_makes_them_and_bad_files_as_errors(tmp_path, audio_dir):
    paths = songs(tmp_path, 4) + [audio_dir / "tone.m4a", audio_dir / "tone.opus", audio_dir / "notes.txt"]
    paths.append(audio_dir / "empty.wav")
    with Pipeline(2) as pipeline:
        out = {d.item.path.name: d for d in pipeline.decode(items(paths), ahead=2)}
    assert set(out) == {path.name for path in paths}
    for path in paths:
        decoded = out[path.name]
        if path.name in ("notes.txt", "empty.wav"):
            assert decoded.clip is None and decoded.error
            continue
        assert decoded.error is None and decoded.identity["path"] == str(path.resolve())
        expected = load_audio(path)
        assert decoded.clip.samples.dtype == np.float32 and decoded.clip.samples.flags.writeable
        np.testing.assert_array_equal(decoded.clip.samples, expected.samples)
        assert decoded.clip.source == expected.source and decoded.audio_s > 0
    assert "empty file" in out["empty.wav"].error


@pytest.mark.parametrize("allow_partial", [False, True])
def test_how_much_to_decode_and_partial_files_are_as_load_audio_decides(tmp_path, allow_partial):
    long = songs(tmp_path, 1, seconds=6.0)[0]
    short = pcm_wav(tmp_path / "short.wav", tone(1.0), RATE, declared_frames=3 * RATE)  # 3 s promised, 1 s held
    unlisted = Item(tmp_path / "locked", Path("locked"), error="cannot list it: Permission denied")
    with Pipeline(1, {"max_seconds": 2.0, "allow_partial": allow_partial}) as pipeline:
        out = {d.item.path.name: d for d in pipeline.decode([*items([long, short]), unlisted], ahead=4)}
    assert out["locked"].clip is None and out["locked"].error == unlisted.error  # discovery's reason, not decoded
    expected = load_audio(long, max_seconds=2.0)
    np.testing.assert_array_equal(out[long.name].clip.samples, expected.samples)
    assert out[long.name].clip.duration == expected.duration == pytest.approx(6.0)  # the whole file's length
    if allow_partial:
        assert out["short.wav"].clip.partial == load_audio(short, allow_partial=True).partial is not None
    else:
        assert out["short.wav"].clip is None and "--allow-partial" in out["short.wav"].error


def test_files_are_read_only_as_far_as_the_consumer_takes(tmp_path):
    paths = songs(tmp_path, 2) * 20
    taken = []

    def source():
        for item in items(paths):
            taken.append(item)
            yield item

    with Pipeline(1) as pipeline:
        decoded = pipeline.decode(source(), ahead=3)
        next(decoded)
        time.sleep(2.0)  # the worker has long finished what it holds
        assert len(taken) <= 1 + 3 + 2 + 1  # taken one, `ahead` waiting, DEPTH in the worker, one in hand
        assert len(list(decoded)) == len(paths) - 1


def test_a_stuck_file_is_given_up_after_two_tries_and_costs_no_other_file(tmp_path):
    good = songs(tmp_path, 3)
    stuck = endless(tmp_path / "stuck.wav")
    with Pipeline(1, timeout_s=1.5) as pipeline:
        out = {d.item.path.name: d for d in pipeline.decode(items([good[0], stuck, *good[1:]]), ahead=4)}
    assert out["stuck.wav"].clip is None
    assert "failed on this file 2 times (still decoding after 2 s)" in out["stuck.wav"].error
    assert all(out[path.name].clip is not None for path in good)


def test_a_killed_worker_costs_only_its_file(tmp_path):
    good = songs(tmp_path, 4)
    stuck = endless(tmp_path / "stuck.wav")
    with Pipeline(2, timeout_s=60) as pipeline:  # the timeout only ends the test if no kill comes
        decoded = pipeline.decode(items([stuck, *good]), ahead=8)
        kills = []

        def kill_whoever_holds_the_file():  # twice: the file's first try and its retry
            while len(kills) < 2:
                for pid in pipeline.pids:
                    if pid not in kills and alive(pid) and _holds(pid, stuck):
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                time.sleep(0.05)

        killer = threading.Thread(target=kill_whoever_holds_the_file, daemon=True)
        killer.start()
        out = {d.item.path.name: d for d in decoded}
        killer.join(timeout=10)
    assert len(kills) == 2
    assert "failed on this file 2 times (killed by SIGKILL)" in out["stuck.wav"].error
    assert all(out[path.name].clip is not None for path in good)


def test_a_worker_that_dies_while_the_consumer_is_busy_costs_only_its_file(tmp_path):
    good = songs(tmp_path, 4)
    stuck = endless(tmp_path / "stuck.wav")
    with Pipeline(1, timeout_s=3) as pipeline:
        decoded = pipeline.decode(items([*good[:2], stuck, *good[2:]]), ahead=1)
        deadline = time.monotonic() + 30
        while not (pipeline.pids and _holds(pipeline.pids[0], stuck)) and time.monotonic() < deadline:
            time.sleep(0.05)  # nothing taken yet: the pipeline's thread waits for the consumer
        os.kill(pipeline.pids[0], signal.SIGKILL)
        time.sleep(0.5)  # dead before the pipeline next writes to it
        out = {d.item.path.name: d for d in decoded}
    assert "failed on this file 2 times" in out["stuck.wav"].error
    assert all(out[path.name].clip is not None for path in good)


def test_clips_held_by_the_consumer_keep_no_file_open(tmp_path):
    paths = songs(tmp_path, 2, seconds=0.5) * 100
    open_files = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = open_files()
    with Pipeline(1) as pipeline:
        held = list(pipeline.decode(items(paths), ahead=8))
        assert len(held) == 200 and all(len(d.clip.samples) for d in held)
        assert open_files() - before <= 4  # the worker's socket and the like, not one per clip
    held[0].clip.samples[:10] = 0.0  # the consumer's own memory: writable


def test_closing_the_pipeline_ends_a_consumer_waiting_on_it(tmp_path):
    pipeline = Pipeline(1, timeout_s=600)
    decoded = pipeline.decode(items([endless(tmp_path / "stuck.wav")]), ahead=1)
    taken = []
    consumer = threading.Thread(target=lambda: taken.extend(decoded), daemon=True)
    consumer.start()
    time.sleep(1.0)  # the consumer waits for a file that will not decode in time
    pipeline.close()
    consumer.join(timeout=10)
    assert not consumer.is_alive() and taken == []  # it ends, instead of waiting for ever


def _holds(pid: int, path: Path) -> bool:
    """The process has the file open (it is decoding it)."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


PARENT = """
import os, sys, time
from pathlib import Path
from acecap.inputs import Item
from acecap.pipeline import Pipeline
pipeline = Pipeline(2)
decoded = pipeline.decode([Item(Path(p), Path(p)) for p in sys.argv[1:]], ahead=2)
while len(pipeline.pids) < 2:
    time.sleep(0.05)
print(*pipeline.pids, flush=True)
time.sleep(600)
"""


def test_workers_die_with_their_parent_even_when_stuck(tmp_path):
    long = [endless(tmp_path / "a.wav"), endless(tmp_path / "b.wav")]
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT), *map(str, long)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    time.sleep(0.5)  # both are decoding now, not reading their sockets
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)


def test_default_workers_leave_a_core_per_device():
    cores = len(os.sched_getaffinity(0))
    assert default_workers(1) == max(1, cores - 1)
    assert default_workers(cores) == 1
    with pytest.raises(ValueError, match="decode-workers"):
        Pipeline(0)


def decode_workers_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"acecap.pipeline" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_kill_9_of_annotate_leaves_no_decode_process(tiny_model, tmp_path):
    (tmp_path / "in").mkdir()
    for path in songs(tmp_path / "in", 2, seconds=3.0):
        for copy in range(15):
            (path.parent / f"{copy}-{path.name}").write_bytes(path.read_bytes())
    command = [sys.executable, "-m", "acecap", "annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               "--model", str(tiny_model), "--decode-workers", "2", "--max-new-tokens", "4", "--quiet"]  # fmt: skip
    annotate = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers = []
    while len(workers) < 2 and time.monotonic() < deadline and annotate.poll() is None:
        workers = decode_workers_of(annotate.pid)
        time.sleep(0.05)
    assert len(workers) == 2, "annotate should decode in two worker processes"
    annotate.kill()
    annotate.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
