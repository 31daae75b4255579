import json
import os
import stat
from pathlib import Path

import pytest

from acecap.records import RecordWriter, load_records, merge
from acecap.writers import atomic_write, check_writable, to_json

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
