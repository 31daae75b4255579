"""`annotate --tasks caption,lyrics,meta -f acestep`: a dataset ACE-Step's scanner reads as written."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import run_acecap
from test_benchmarks import load_program

from acecap.acestep import WRITTEN, export

AUDIO = (".wav", ".mp3", ".flac", ".ogg", ".opus")


def scan(folder: Path) -> dict[str, dict]:
    """ACE-Step 1.5's dataset scanner rules (../shared/brief/formats.md), written independently of acecap:
    per audio file, song.caption.txt, then song.json's five keys, then any *.csv row (headers
    case-insensitive) override in that order; lyrics from song.lyrics.txt, else song.txt."""
    found = {}
    tables = {}
    for table in folder.glob("*.csv"):
        with table.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                row = {key.strip().lower(): value for key, value in row.items()}
                tables[row["file"]] = row
    for audio in sorted(p for p in folder.iterdir() if p.suffix in AUDIO):
        base = audio.with_suffix("")
        entry = {"caption": None, "bpm": None, "keyscale": None, "timesignature": None, "language": None}
        caption = base.with_name(base.name + ".caption.txt")
        if caption.is_file():
            entry["caption"] = caption.read_text(encoding="utf-8").strip()
        lyrics = base.with_name(base.name + ".lyrics.txt")
        lyrics = lyrics if lyrics.is_file() else base.with_name(base.name + ".txt")
        entry["lyrics"] = lyrics.read_text(encoding="utf-8").strip() if lyrics.is_file() else None
        sidecar = base.with_name(base.name + ".json")
        if sidecar.is_file():
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            entry.update({key: data[key] for key in entry if key in data and key != "lyrics"})
        if audio.name in tables:
            row = tables[audio.name]
            entry.update({"bpm": int(row["bpm"]) if row["bpm"] else None, "keyscale": row["key"] or None})
            entry["caption"] = row["caption"] or entry["caption"]
        found[audio.name] = entry
    return found


def write_songs(folder: Path) -> Path:
    """Two short band clips of known tempo and key (the meta benchmark's numpy corpus), as 44.1 kHz wavs."""
    synth = load_program("meta_synth")
    rng = np.random.default_rng(0)
    folder.mkdir()
    for case in (synth.Case("waltz", "band", 96, 3, "D major"), synth.Case("rock", "band", 128, 4, "A minor")):
        mono = synth.render(case, 12.0, rng)
        soundfile.write(folder / f"{case.name}.wav", np.stack([mono, mono], axis=1), synth.RATE)
    return folder


def confident(meta: dict, key: str, unknown, min_confidence: float = 0.3):
    """What the ACE-Step files should say for a meta record's value: it, or unknown below the threshold."""
    return meta[key] if meta[f"{key}_confidence"] >= min_confidence else unknown


def records_by_file(out: Path) -> dict[tuple[str, str], dict]:
    lines = (out / "annotations.jsonl").read_text(encoding="utf-8").splitlines()
    return {(Path(r["path"]).name, r["task"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_a_dataset_ace_step_reads_back(tiny_model, tmp_path):
    songs = write_songs(tmp_path / "songs")
    out = tmp_path / "labels"
    tasks = "caption,lyrics,meta"
    formats = ["-f", "acestep", "-f", "csv", "-f", "acestep-dataset"]
    result = run_acecap(
        "annotate", str(songs), "-o", str(out), "--tasks", tasks, *formats, "--model", str(tiny_model),
        "--device", "cpu", "--max-new-tokens", "8", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = records_by_file(out)
    assert {task for _, task in records} == {"caption", "lyrics", "meta"} and len(records) == 6
    scanned = scan(songs)
    for name, entry in scanned.items():
        caption, lyrics, meta = (records[(name, task)] for task in ("caption", "lyrics", "meta"))
        assert entry["caption"] == caption["caption"].strip()
        assert entry["lyrics"] == lyrics["lyrics"]
        assert entry["language"] == lyrics["language"]
        assert entry["bpm"] == confident(meta, "bpm", None)
        assert entry["keyscale"] == confident(meta, "keyscale", "")
        beats = confident(meta, "timesignature", None)
        assert entry["timesignature"] == ("" if beats is None else str(beats))
        assert (meta["bpm_source"], meta["keyscale_source"], meta["timesignature_source"]) == ("signal",) * 3
        assert lyrics["raw_lyrics"] is not None and isinstance(lyrics["is_instrumental"], bool)
    # The signal analysis finds what the material was made with.
    assert (records[("waltz.wav", "meta")]["keyscale"], records[("rock.wav", "meta")]["keyscale"]) == (
        "D major",
        "A minor",
    )
    assert abs(records[("rock.wav", "meta")]["bpm"] - 128) <= 2

    # The csv, put where the scanner looks, outranks the sidecars.
    table = out / "dataset.csv"
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert [r["File"] for r in rows] == ["rock.wav", "waltz.wav"] or [r["File"] for r in rows] == [
        "waltz.wav",
        "rock.wav",
    ]
    edited = table.read_text(encoding="utf-8").replace(rows[0]["Caption"], "from the table", 1)
    (songs / "labels.csv").write_text(edited, encoding="utf-8")
    assert scan(songs)[rows[0]["File"]]["caption"] == "from the table"

    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["metadata"]["num_samples"] == 2 == len(dataset["samples"])
    sample = next(s for s in dataset["samples"] if s["filename"] == "waltz.wav")
    assert sample["keyscale"] == "D major" and sample["caption"] == records[("waltz.wav", "caption")]["caption"]
    assert sample["lyrics"] == records[("waltz.wav", "lyrics")]["lyrics"] and sample["labeled"] is True


@pytest.mark.slow
def test_hand_edited_sidecars_survive_a_rerun(tiny_model, tmp_path):
    songs = write_songs(tmp_path / "songs")
    (songs / "waltz.caption.txt").write_text("A waltz I described myself.\n", encoding="utf-8")
    (songs / "waltz.json").write_text(json.dumps({"bpm": 95, "genre": "folk", "mine": True}), encoding="utf-8")
    out = tmp_path / "labels"
    base = ["annotate", str(songs), "-o", str(out), "--tasks", "caption,meta", "-f", "acestep"]
    options = ["--model", str(tiny_model), "--device", "cpu", "--max-new-tokens", "4", "--quiet"]
    assert run_acecap(*base, *options).returncode == 0
    assert (songs / "waltz.caption.txt").read_text(encoding="utf-8") == "A waltz I described myself.\n"
    kept = json.loads((songs / "waltz.json").read_text(encoding="utf-8"))
    assert (kept["bpm"], kept["genre"], kept["mine"]) == (95, "folk", True)  # kept
    assert kept["keyscale"] == "D major" and kept["timesignature"] == "3"  # added
    assert (songs / "rock.caption.txt").is_file()  # nothing there before: written

    copy = tmp_path / "before"
    shutil.copytree(songs, copy)
    assert run_acecap(*base, *options).returncode == 0  # a plain re-run changes nothing
    assert all((songs / p.name).read_bytes() == p.read_bytes() for p in copy.iterdir())

    # A higher --max-new-tokens redoes the cut captions (the tiny model never ends one): what acecap wrote from
    # the cut ones is replaced, what a person wrote stays.
    longer = [option if option != "4" else "8" for option in options]
    assert run_acecap(*base, *longer).returncode == 0
    records = records_by_file(out)
    assert records[("rock.wav", "caption")]["tokens"] == 8
    assert (songs / "rock.caption.txt").read_text(encoding="utf-8").strip() == records[("rock.wav", "caption")][
        "caption"
    ].strip()
    assert (songs / "waltz.caption.txt").read_text(encoding="utf-8") == "A waltz I described myself.\n"
    assert json.loads((songs / "waltz.json").read_text(encoding="utf-8"))["bpm"] == 95

    assert run_acecap(*base, *options, "--overwrite").returncode == 0
    replaced = json.loads((songs / "waltz.json").read_text(encoding="utf-8"))
    assert replaced["bpm"] != 95 and replaced["mine"] is True  # acecap's values win; unknown keys stay
    records = records_by_file(out)
    assert (songs / "waltz.caption.txt").read_text(encoding="utf-8").strip() == records[("waltz.wav", "caption")][
        "caption"
    ].strip()


@pytest.mark.slow
def test_sidecars_can_go_under_another_folder(tiny_model, tmp_path):
    songs = write_songs(tmp_path / "songs")
    out, mirror = tmp_path / "labels", tmp_path / "mirror"
    result = run_acecap(
        "annotate", str(tmp_path / "songs"), "-o", str(out), "--tasks", "meta", "-f", "acestep",
        "--sidecars-in", str(mirror), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in songs.iterdir()) == ["rock.wav", "waltz.wav"]  # the songs' folder untouched
    assert json.loads((mirror / "rock.json").read_text(encoding="utf-8"))["keyscale"] == "A minor"


@pytest.mark.slow
def test_every_song_json_has_the_trainer_keys_and_unsure_values_stay_unknown(tmp_path):
    songs = write_songs(tmp_path / "songs")
    out = tmp_path / "labels"
    base = ["annotate", str(songs), "-o", str(out), "--tasks", "meta", "-f", "acestep", "-f", "csv", "--quiet"]
    assert run_acecap(*base, "--meta-min-confidence", "1").returncode == 0
    records = records_by_file(out)
    for name in ("waltz", "rock"):
        sidecar = json.loads((songs / f"{name}.json").read_text(encoding="utf-8"))
        # No lyrics were transcribed: the language is "unknown", not missing (ACE-Step's convention).
        assert {"bpm", "keyscale", "timesignature", "language"} <= set(sidecar) and sidecar["language"] == "unknown"
        # Nothing the signal says is certain, so nothing is written as if it were; the record keeps it all.
        assert (sidecar["bpm"], sidecar["keyscale"], sidecar["timesignature"]) == (None, "", "")
        meta = records[(f"{name}.wav", "meta")]
        assert meta["bpm"] and meta["keyscale"] and 0 < meta["keyscale_confidence"] < 1
    rows = list(csv.DictReader((out / "dataset.csv").open(encoding="utf-8")))
    assert {(row["BPM"], row["Key"]) for row in rows} == {("", "")}
    # A lower threshold on a later run fills what is still unknown; values a person wrote would stay.
    assert run_acecap(*base, "--meta-min-confidence", "0").returncode == 0
    sidecar = json.loads((songs / "rock.json").read_text(encoding="utf-8"))
    assert sidecar["keyscale"] == records[("rock.wav", "meta")]["keyscale"] and sidecar["bpm"] is not None


@pytest.mark.slow
def test_tags_come_first_and_records_say_where_values_came_from(tmp_path):
    from mutagen.flac import FLAC

    songs = write_songs(tmp_path / "songs")
    tagged = songs / "tagged.flac"
    soundfile.write(tagged, soundfile.read(songs / "rock.wav")[0], 44100)
    audio = FLAC(tagged)
    audio["BPM"], audio["INITIALKEY"] = "64", "4A"  # what a DJ tool wrote: half the tempo, Camelot F minor
    audio.save()
    out = tmp_path / "labels"
    base = ["annotate", str(songs), "-o", str(out), "--tasks", "meta", "-f", "acestep", "--quiet"]
    assert run_acecap(*base, "--meta-min-confidence", "1").returncode == 0
    meta = records_by_file(out)[("tagged.flac", "meta")]
    assert (meta["bpm"], meta["bpm_source"], meta["bpm_confidence"]) == (64, "tags", 1.0)
    assert (meta["keyscale"], meta["keyscale_source"]) == ("F minor", "tags")
    assert meta["timesignature_source"] == "signal" and meta["tags"] == {"BPM": "64", "INITIALKEY": "4A"}
    sidecar = json.loads((songs / "tagged.json").read_text(encoding="utf-8"))
    assert (sidecar["bpm"], sidecar["keyscale"]) == (64, "F minor")  # a tag is kept at any threshold
    # --meta-source signal ignores the tags; it is a different estimator, so the files are analysed again.
    assert run_acecap(*base, "--meta-source", "signal", "--overwrite").returncode == 0
    meta = records_by_file(out)[("tagged.flac", "meta")]
    assert meta["bpm_source"] == "signal" and abs(meta["bpm"] - 128) <= 2 and meta["model"].endswith("(signal)")
    result = run_acecap(*base, "--meta-source", "tags,guess")
    assert result.returncode != 0 and "--meta-source" in result.stderr


def test_a_name_that_is_not_utf8_is_left_out_of_the_csv_which_stays_readable(tmp_path):
    names = ["plain.wav", os.fsdecode(b"latin1_\xe9.wav")]  # the second held with a lone surrogate
    records = [{"path": str(tmp_path / name), "task": "caption", "caption": f"about {name!r}", "error": None}
               for name in names]  # fmt: skip
    relative = {record["path"]: Path(Path(record["path"]).name) for record in records}
    written, failed = export(records, relative, ["csv", "acestep-dataset"], tmp_path)
    assert not failed
    rows = list(csv.DictReader((tmp_path / "dataset.csv").open(encoding="utf-8")))  # strict UTF-8 reads it
    assert [row["File"] for row in rows] == ["plain.wav"]
    samples = json.loads((tmp_path / "dataset.json").read_bytes().decode("utf-8"))["samples"]
    assert [s["filename"] for s in samples] == names  # the JSON escapes the byte, so it keeps the song


def test_a_value_acecap_wrote_and_now_withholds_becomes_unknown_but_a_persons_stays(tmp_path):
    from acecap.acestep import Song, write_sidecars

    audio, written = tmp_path / "drone.wav", {}
    first = Song(audio, Path(audio.name), caption="A drone.", bpm=120, keyscale="A minor")
    write_sidecars(first, None, written=written)
    redone = Song(audio, Path(audio.name), caption="A drone.", bpm=None, keyscale="A minor")  # now below threshold
    write_sidecars(redone, None, written=written)
    assert json.loads((tmp_path / "drone.json").read_text())["bpm"] is None  # as dataset.csv leaves it
    sidecar = json.loads((tmp_path / "drone.json").read_text())
    (tmp_path / "drone.json").write_text(json.dumps({**sidecar, "bpm": 118}))  # a person sets it
    write_sidecars(Song(audio, Path(audio.name), caption="A drone.", bpm=121), None, written=written)
    assert json.loads((tmp_path / "drone.json").read_text())["bpm"] == 118


def test_what_acecap_wrote_is_replaced_by_a_redo_whatever_runs_came_between(tmp_path):
    """The ledger, not the records before the run: a redo whose run exported nothing (interrupted, or without
    -f acestep) still replaces acecap's text at the next export; a person's stays."""
    relative = {str(tmp_path / f"{name}.wav"): Path(f"{name}.wav") for name in ("a", "b")}

    def records(text: str) -> list[dict]:
        return [{"path": path, "task": "caption", "error": None, "caption": f"{text} {Path(path).stem}"}
                for path in relative]  # fmt: skip

    export(records("cut"), relative, ["acestep"], tmp_path / "out")
    (tmp_path / "b.caption.txt").write_text("My own words.\n")
    # A run redid both (its records: "whole") but exported nothing; the next run's records are the same.
    export(records("whole"), relative, ["acestep"], tmp_path / "out", records_before=records("whole"))
    assert (tmp_path / "a.caption.txt").read_text() == "whole a\n"
    assert json.loads((tmp_path / "a.json").read_text())["caption"] == "whole a"
    assert (tmp_path / "b.caption.txt").read_text() == "My own words.\n"
    assert json.loads((tmp_path / "b.json").read_text())["caption"] == "whole b"  # the json was still acecap's
    assert (tmp_path / "out" / WRITTEN).is_file()


def test_a_moved_dataset_or_a_broken_ledger_falls_back_to_the_records_before(tmp_path):
    def records(folder, text: str) -> tuple[list[dict], dict]:
        path = str(folder / "a.wav")
        return [{"path": path, "task": "caption", "error": None, "caption": text}], {path: Path("a.wav")}

    (tmp_path / "songs").mkdir()
    export(*records(tmp_path / "songs", "cut"), ["acestep"], tmp_path / "out")
    (tmp_path / "songs").rename(tmp_path / "moved")  # roots.json changed: the same records, another folder
    before, relative = records(tmp_path / "moved", "cut")
    export(records(tmp_path / "moved", "whole")[0], relative, ["acestep"], tmp_path / "out", records_before=before)
    assert (tmp_path / "moved" / "a.caption.txt").read_text() == "whole\n"
    (tmp_path / "out" / WRITTEN).write_text("[]\n")  # valid JSON, not a ledger: warned about, not a crash
    export(records(tmp_path / "moved", "again")[0], relative, ["acestep"], tmp_path / "out",
           records_before=records(tmp_path / "moved", "whole")[0])  # fmt: skip
    assert (tmp_path / "moved" / "a.caption.txt").read_text() == "again\n"


def test_a_stricter_threshold_on_a_rerun_takes_back_the_guesses_acecap_wrote_under_a_looser_one(tmp_path):
    meta = {
        "path": str(tmp_path / "plain.wav"),
        "task": "meta",
        "error": None,
        "bpm": 120,
        "bpm_confidence": 0.9,
        "keyscale": "C minor",
        "keyscale_confidence": 0.24,
        "timesignature": 4,
        "timesignature_confidence": 0.11,
    }
    relative = {meta["path"]: Path("plain.wav")}
    export([meta], relative, ["acestep"], tmp_path, min_confidence=0.0)
    assert json.loads((tmp_path / "plain.json").read_text())["keyscale"] == "C minor"
    export([meta], relative, ["acestep"], tmp_path, min_confidence=0.5, records_before=[meta])
    sidecar = json.loads((tmp_path / "plain.json").read_text())
    assert (sidecar["bpm"], sidecar["keyscale"], sidecar["timesignature"]) == (120, "", "")
