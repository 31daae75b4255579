"""annotate's inputs as a user gives them: checked before any model loads, and recorded under their root."""

from __future__ import annotations

import json

import numpy as np
import soundfile
from conftest import run_acecap

from acecap.records import ANNOTATIONS, ROOTS, load_records
from acecap.reviews import FIELDS, REVIEWS, append_review, load_reviews


def annotate_cli(tiny_model, *args: str):
    return run_acecap("annotate", *args, "--model", str(tiny_model), "--max-new-tokens", "3")


def test_a_missing_input_fails_at_once_without_loading_the_model(tiny_model, tmp_path):
    soundfile.write(tmp_path / "song.wav", np.zeros(16000, np.float32), 16000)
    result = annotate_cli(tiny_model, str(tmp_path / "song.wav"), str(tmp_path / "nosuchdir"), "-o",
                          str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"acecap: error: {tmp_path / 'nosuchdir'}: no such file or folder"]
    assert not (tmp_path / "out").exists(), "nothing is written for a mistyped input"
    (tmp_path / "link.wav").symlink_to(tmp_path / "gone.wav")
    result = annotate_cli(tiny_model, str(tmp_path / "link.wav"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "which does not exist" in result.stderr and "model on" not in result.stderr


def test_an_empty_folder_or_manifest_says_so_and_fails(tiny_model, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("no audio here\n")
    (tmp_path / "list.txt").write_text("# nothing listed yet\n")
    result = annotate_cli(tiny_model, str(tmp_path / "empty"), str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'empty'}: no audio files in it (looked for " in line and "wav" in line
    assert f"{tmp_path / 'list.txt'}: lists no files" in line


def test_a_shard_with_no_share_of_the_files_is_not_an_error(tiny_model, tmp_path):
    soundfile.write(tmp_path / "song.wav", np.zeros(16000, np.float32), 16000)
    results = [annotate_cli(tiny_model, str(tmp_path), "-o", str(tmp_path / f"out{i}"), "--shard", f"{i}/2", "--quiet")
               for i in range(2)]  # fmt: skip
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert sorted("files          1 " in r.stderr for r in results) == [False, True]


def test_records_name_files_under_their_root_and_the_root_once(tiny_model, tmp_path):
    """A folder, a manifest (an entry in a subfolder, one outside its folder) and a file given directly."""
    songs, lists, elsewhere = tmp_path / "songs", tmp_path / "data" / "lists", tmp_path / "data" / "more"
    for path in (songs / "sub" / "a.wav", lists / "sub" / "b.wav", elsewhere / "c.wav", tmp_path / "single" / "d.wav"):
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.random.default_rng(len(str(path))).standard_normal(16000) * 0.1, 16000)
    (lists / "list.txt").write_text("sub/b.wav\n../more/c.wav\n")
    out = tmp_path / "out"
    result = annotate_cli(tiny_model, str(songs), str(lists / "list.txt"), str(tmp_path / "single" / "d.wav"),
                          "-o", str(out), "-f", "txt", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    roots = json.loads((out / ROOTS).read_text())
    assert roots == {"songs": str(songs), "data": str(tmp_path / "data"), "single": str(tmp_path / "single")}
    stored = [json.loads(line) for line in (out / ANNOTATIONS).read_text().splitlines()]
    assert sorted((r["root"], r["path"]) for r in stored) == [
        ("data", "lists/sub/b.wav"), ("data", "more/c.wav"), ("single", "d.wav"), ("songs", "sub/a.wav"),
    ]  # fmt: skip
    assert str(tmp_path) not in (out / ANNOTATIONS).read_text()  # no folder of this machine in the records
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == [
        "d.caption.txt", "lists/sub/b.caption.txt", "more/c.caption.txt", "sub/a.caption.txt",
    ]  # fmt: skip
    assert {r["path"] for r in load_records(out)} == {
        str(songs / "sub" / "a.wav"), str(lists / "sub" / "b.wav"), str(elsewhere / "c.wav"),
        str(tmp_path / "single" / "d.wav"),
    }  # fmt: skip

    # The dataset moves: one line of roots.json changed, and a run on the new folder has nothing to redo.
    songs.rename(tmp_path / "moved")
    (out / ROOTS).write_text(json.dumps({**roots, "songs": str(tmp_path / "moved")}))
    again = annotate_cli(tiny_model, str(tmp_path / "moved"), "-o", str(out), "--quiet")
    assert again.returncode == 0 and "files          1 (1 done earlier)" in again.stderr, again.stderr


def test_an_older_folder_with_absolute_paths_resumes_without_redoing_work(tiny_model, tmp_path):
    for index in range(3):
        (tmp_path / "songs").mkdir(exist_ok=True)
        soundfile.write(tmp_path / "songs" / f"{index}.wav", np.full(8000 * (index + 1), 0.1, np.float32), 16000)
    out = tmp_path / "out"
    assert annotate_cli(tiny_model, str(tmp_path / "songs"), "-o", str(out), "--quiet").returncode == 0
    # As versions before roots.json wrote them: every path absolute, no root, no roots.json; and a review.
    old = [{key: value for key, value in r.items() if key != "root"} for r in load_records(out)]
    (out / ANNOTATIONS).write_text("".join(json.dumps(r) + "\n" for r in old))
    (out / ROOTS).unlink()
    (out / REVIEWS).write_text(json.dumps({"path": old[0]["path"], "approved": True, "fields": {"bpm": 90}}) + "\n")
    result = annotate_cli(tiny_model, str(tmp_path / "songs"), "-o", str(out))
    assert result.returncode == 0 and "files          3 (3 done earlier)" in result.stderr, result.stderr
    assert "model on" not in result.stderr  # nothing to do: no model loaded
    migrated = [json.loads(line) for line in (out / ANNOTATIONS).read_text().splitlines()]
    assert [(r["root"], r["path"]) for r in migrated] == [("songs", f"{i}.wav") for i in range(3)]
    assert [{k: v for k, v in r.items() if k not in ("root", "path")} for r in migrated] == [
        {k: v for k, v in r.items() if k != "path"} for r in old
    ]  # the same records otherwise
    assert load_reviews(out)[old[0]["path"]]["approved"]  # the old review still finds its record
    append_review(out, old[1]["path"], {key: None for key in FIELDS}, approved=False)
    assert json.loads((out / REVIEWS).read_text().splitlines()[-1])["path"] == "1.wav"  # new reviews: under the root
    assert set(load_reviews(out)) == {old[0]["path"], old[1]["path"]}
