"""annotate's files beside the records: added to a finished job, and never two files' outputs in one file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import run_acecap

from acecap import Decoding
from acecap.annotate import Job, annotate
from acecap.records import load_records


def write(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    soundfile.write(path, (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32), 16000)
    return path


def annotate_cli(tiny_model, *args: str):
    return run_acecap("annotate", *args, "--model", str(tiny_model), "--max-new-tokens", "3", "--quiet")


@pytest.mark.slow
def test_a_redo_by_a_run_that_wrote_no_files_reaches_them_at_the_next_run_that_does(tiny_model, tmp_path):
    """Files redone by a run without -f (or one interrupted before its export) hold the old texts; the next run
    with -f txt -f acestep writes the new ones, though nothing is left to caption."""
    songs, out = tmp_path / "songs", tmp_path / "out"
    for index, name in enumerate(("a.wav", "b.wav")):
        write(songs / name, seed=index)
    files = ["-f", "txt", "-f", "acestep"]
    assert annotate_cli(tiny_model, str(songs), "-o", str(out), *files).returncode == 0  # cut at 3 tokens
    longer = ["--model", str(tiny_model), "--max-new-tokens", "6", "--quiet"]
    assert run_acecap("annotate", str(songs), "-o", str(out), *longer).returncode == 0  # redone, no files written
    assert run_acecap("annotate", str(songs), "-o", str(out), *files, *longer).returncode == 0
    for record in load_records(out):
        name = Path(record["path"]).stem
        assert record["tokens"] == 6
        assert (out / f"{name}.caption.txt").read_text() == record["caption"] + "\n"
        assert (songs / f"{name}.caption.txt").read_text() == record["caption"].strip() + "\n"
        assert json.loads((songs / f"{name}.json").read_text())["caption"] == record["caption"]


@pytest.mark.slow
def test_formats_added_to_a_finished_job_are_written_from_its_records(tiny_model, tmp_path):
    songs = tmp_path / "songs"
    for index, name in enumerate(("a.wav", "sub/b.wav", "sub/deeper/c.wav")):
        write(songs / name, seed=index)
    out = tmp_path / "out"
    first = annotate_cli(tiny_model, str(songs), "-o", str(out), "--tasks", "caption,meta")
    assert first.returncode == 0, first.stderr
    assert not list(out.rglob("*.txt")) and not list(songs.rglob("*.json"))
    formats = ["-f", "txt", "-f", "acestep", "-f", "csv", "-f", "acestep-dataset"]
    # The same --max-new-tokens: a run allowing more would redo the texts the first run cut.
    again = run_acecap("annotate", str(songs), "-o", str(out), "--tasks", "caption,meta", *formats,
                       "--model", str(tiny_model), "--max-new-tokens", "3")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("files          3 (3 done earlier)") == 2 and "model on" not in again.stderr
    assert "3 .caption.txt files written from earlier records" in again.stderr
    records = {(r["path"], r["task"]): r for r in load_records(out)}
    for name in ("a", "sub/b", "sub/deeper/c"):
        audio = str(songs / f"{name}.wav")
        caption, meta = records[(audio, "caption")]["caption"], records[(audio, "meta")]["meta"]
        assert (out / f"{name}.caption.txt").read_text() == caption + "\n"
        assert (out / f"{name}.meta.txt").read_text() == meta + "\n"
        assert (songs / f"{name}.caption.txt").read_text() == caption + "\n"
        assert json.loads((songs / f"{name}.json").read_text())["caption"] == caption
    with (out / "dataset.csv").open() as handle:
        # The bare file name, subfolders or not: what ACE-Step's scanner (which walks every subfolder) matches.
        assert sorted(row["File"] for row in csv.DictReader(handle)) == ["a.wav", "b.wav", "c.wav"]
    samples = json.loads((out / "dataset.json").read_text())["samples"]
    assert sorted(s["audio_path"] for s in samples) == sorted(
        str(songs / f"{n}.wav") for n in ("a", "sub/b", "sub/deeper/c")
    )


@pytest.mark.slow
def test_outputs_two_files_would_share_are_refused_before_any_work(tiny_model, tmp_path):
    songs = tmp_path / "songs"
    write(songs / "x" / "song.wav")
    write(songs / "x" / "song.ogg", seed=1)  # the same name, another format
    write(songs / "a" / "intro.wav", seed=2)
    write(songs / "b" / "intro.wav", seed=3)
    out = tmp_path / "out"
    for fmt, pairs in (("acestep", ["x/song.ogg and", "x/song.wav"]), ("txt", ["x/song.ogg and", "x/song.wav"]),
                       ("csv", ["a/intro.wav and", "b/intro.wav"])):  # fmt: skip
        result = annotate_cli(tiny_model, str(songs), "-o", str(out), "-f", fmt)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()  # one line, naming every pair, before anything is written
        assert line.startswith(f"acecap: error: -f {fmt}: ") and all(pair in line for pair in pairs), line
        assert "leave out that -f" in line and not out.exists() and not list(songs.rglob("*.json"))
    # Files that clash in one format may not in another: sidecars beside each intro.wav are apart.
    result = annotate_cli(tiny_model, str(songs / "a"), str(songs / "b"), "-o", str(out), "-f", "acestep")
    assert result.returncode == 0, result.stderr
    assert (songs / "a" / "intro.json").is_file() and (songs / "b" / "intro.json").is_file()
    with pytest.raises(ValueError, match="-f txt: .* would write one file: .*intro.wav and .*intro.wav"):
        annotate(Job(inputs=[str(songs / "a"), str(songs / "b")], output_dir=tmp_path / "api", model=str(tiny_model),
                     devices=["cpu"], write_txt=True, decoding=Decoding(max_new_tokens=3)), progress=False)  # fmt: skip
    assert not (tmp_path / "api").exists()
