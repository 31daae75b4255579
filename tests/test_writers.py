import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from acecap.records import ANNOTATIONS, RecordWriter, load_records, merge
from acecap.writers import atomic_write, check_unique_names, check_writable, to_json

LATIN1_NAME = os.fsdecode(b"latin1_\xe9\xff.wav")  # not UTF-8: Python holds \xe9\xff as lone surrogates


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_non_utf8_file_name_is_valid_json_that_gives_back_the_same_bytes(tmp_path):
    path = os.path.join(str(tmp_path), LATIN1_NAME)
    line = to_json({"path": path, "caption": "Ünïcödé stays as it is"})
    line.encode("utf-8")  # valid UTF-8 text: every tool can read it
    assert "\\udce9\\udcff" in line and "Ünïcödé" in line
    assert os.fsencode(json.loads(line)["path"]) == os.fsencode(str(tmp_path)) + b"/latin1_\xe9\xff.wav"


def test_records_with_such_names_are_written_merged_and_read_back(tmp_path):
    name = os.path.join(str(tmp_path), LATIN1_NAME)
    RecordWriter(tmp_path, "run-0").write([{"path": name, "task": "caption", "error": None}])
    assert load_records(tmp_path)[0]["path"] == name
    merge(tmp_path)
    assert [r["path"] for r in load_records(tmp_path)] == [name]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "new.txt", "a\n")
        existing = tmp_path / "song.json"
        existing.write_text("{}\n")
        existing.chmod(0o640)
        atomic_write(existing, '{"bpm": 120}\n')
    finally:
        os.umask(previous)
    assert mode(tmp_path / "new.txt") == 0o666 & ~umask
    assert mode(existing) == 0o640 and existing.read_text() == '{"bpm": 120}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "song.json"]  # no temporary file left


def test_a_name_near_the_limit_is_written_and_its_temporary_name_does_not_grow(tmp_path):
    target = tmp_path / ("x" * 240 + ".caption.txt")  # 252 bytes: the limit is 255
    atomic_write(target, "text\n")
    assert target.read_text() == "text\n"
    with pytest.raises(OSError, match="too long"):
        atomic_write(tmp_path / ("x" * 250 + ".caption.txt"), "text\n")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_check_writable_makes_the_folder_and_leaves_nothing_in_it(tmp_path):
    check_writable(tmp_path / "new" / "out")
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())
    (tmp_path / "afile").write_text("")
    with pytest.raises(OSError, match="the output folder .*afile is a file"):
        check_writable(tmp_path / "afile")


def record(name: str) -> dict:
    return {"path": f"/songs/{name}.wav", "task": "caption", "error": None, "caption": name}


def other_run(folder: Path, script: str) -> subprocess.Popen:
    """Another process (as another --shard machine would be) running `script` with `folder` and the helpers
    above; it says "ready" once it holds what it holds, then waits for a line on stdin before finishing."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from acecap.records import RecordWriter, folder_lock
        folder = Path({str(folder)!r})
        def record(name):
            return {{"path": f"/songs/{{name}}.wav", "task": "caption", "error": None, "caption": name}}
    """) + textwrap.dedent(script)
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    return process


def finish(process: subprocess.Popen) -> None:
    process.communicate("go\n", timeout=60)
    assert process.returncode == 0


def captions(folder: Path) -> list[str]:
    return sorted(r["caption"] for r in load_records(folder))


def test_a_merge_keeps_the_file_a_live_run_still_writes_and_folds_in_what_it_wrote(tmp_path):
    running = other_run(
        tmp_path,
        """
        with RecordWriter(folder, "shard1-0") as writer:
            writer.write([record("b1")])
            print("ready", flush=True)
            sys.stdin.readline()
            writer.write([record("b2")])
    """,
    )
    with RecordWriter(tmp_path, "shard0-0") as writer:
        writer.write([record("a1")])
    merge(tmp_path)  # this shard is done; the other is not
    assert [p.name for p in tmp_path.glob("annotations.part-*")] == ["annotations.part-shard1-0.jsonl"]
    assert sorted(json.loads(line)["caption"] for line in (tmp_path / ANNOTATIONS).open()) == ["a1", "b1"]
    finish(running)
    assert captions(tmp_path) == ["a1", "b1", "b1", "b2"]  # merged file, then the live part: read once each
    merge(tmp_path)
    assert not list(tmp_path.glob("annotations.part-*")) and captions(tmp_path) == ["a1", "b1", "b2"]


def test_the_file_of_a_run_that_died_is_merged_and_removed(tmp_path):
    killed = other_run(
        tmp_path,
        """
        writer = RecordWriter(folder, "dead-0")
        writer.write([record("d1")])
        writer.handle.write(b'{"path": "/songs/d2.wav", "ta')  # killed mid-write
        writer.handle.flush()
        print("ready", flush=True)
        sys.stdin.readline()
    """,
    )
    part = tmp_path / "annotations.part-dead-0.jsonl"
    assert captions(tmp_path) == ["d1"] and part.read_bytes().endswith(b'"ta')  # read, not cut: it may be live
    killed.kill()
    killed.wait()
    merge(tmp_path)
    assert not part.exists() and captions(tmp_path) == ["d1"]


def test_a_merge_and_a_reading_wait_for_the_folder_lock_another_process_holds(tmp_path):
    RecordWriter(tmp_path, "mine").write([record("m1")])
    holder = other_run(
        tmp_path,
        """
        with folder_lock(folder):
            print("ready", flush=True)
            sys.stdin.readline()
    """,
    )
    read = []
    merging = threading.Thread(target=merge, args=(tmp_path,))
    reading = threading.Thread(target=lambda: read.extend(load_records(tmp_path)))
    merging.start()
    reading.start()
    merging.join(1.0)
    reading.join(0.1)
    assert merging.is_alive() and reading.is_alive() and not (tmp_path / ANNOTATIONS).exists()
    finish(holder)
    merging.join(30)
    reading.join(30)
    assert not merging.is_alive() and captions(tmp_path) == ["m1"] and [r["caption"] for r in read] == ["m1"]
    assert load_records(tmp_path / "no such folder") == []  # nothing to lock: nothing to read


def test_the_run_written_last_wins_whatever_its_part_file_is_called(tmp_path):
    for name, caption, age in (("zz-old", "first try failed", 600), ("aa-new", "fixed and done", 0)):
        with RecordWriter(tmp_path, name) as writer:
            writer.write([{**record("a"), "caption": caption}])
        when = time.time() - age
        os.utime(tmp_path / f"annotations.part-{name}.jsonl", (when, when))
    merge(tmp_path)
    assert captions(tmp_path) == ["fixed and done"]


def test_records_under_a_root_roots_json_lacks_keep_it_until_it_is_added_back(tmp_path):
    roots = {"songs": "/data/songs", "extra": "/data/extra"}
    (tmp_path / "roots.json").write_text(json.dumps(roots))
    with RecordWriter(tmp_path, "run") as writer:
        writer.write([record("x"), {**record("y"), "path": "/data/extra/y.wav"}])
    merge(tmp_path)
    (tmp_path / "roots.json").write_text(json.dumps({"songs": "/data/songs"}))  # copied without it, say
    assert sorted(r["path"] for r in load_records(tmp_path)) == ["/songs/x.wav", "y.wav"]
    merge(tmp_path)
    on_disk = [json.loads(line) for line in (tmp_path / ANNOTATIONS).open()]
    assert {(r.get("root"), r["path"]) for r in on_disk} == {(None, "/songs/x.wav"), ("extra", "y.wav")}
    (tmp_path / "roots.json").write_text(json.dumps(roots))
    assert sorted(r["path"] for r in load_records(tmp_path)) == ["/data/extra/y.wav", "/songs/x.wav"]


def test_every_pair_of_inputs_that_would_share_an_output_is_named():
    check_unique_names(["a/x.wav", "a/x.wav", "./a/x.wav", "b/y.wav"])  # the same file twice is one input
    with pytest.raises(ValueError, match=r"a/x.wav and b/x.wav and a/x.ogg; a/y.wav and b/y.flac would write"):
        check_unique_names(["a/x.wav", "b/x.wav", "a/y.wav", "a/x.ogg", "b/y.flac", "c/z.wav"])
