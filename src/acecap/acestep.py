"""ACE-Step 1.5's dataset formats, written from annotate's records.

- `acestep`: beside each song (or mirrored under a folder), `song.caption.txt`, `song.lyrics.txt` and
  `song.json` (caption, bpm, keyscale, timesignature, language, duration, is_instrumental), the files its
  dataset scanner reads. Every song.json carries the keys the trainer reads: `bpm` null, `keyscale` and
  `timesignature` empty and `language` "unknown" when not known (the ACE-Step UI's own conventions).
- `csv`: one `File, BPM, Key, Caption` table, which the scanner ranks above both.
- `acestep-dataset`: the dataset JSON the ACE-Step UI saves (`metadata` and `samples[]`).

Files that would share an output (`song.wav` and `song.ogg` → `song.json`; two `intro.wav` rows in the csv)
are refused before any work (check_collisions): the scanner could not tell them apart either.

A value a person already wrote is kept unless `overwrite`: acecap adds, it does not clobber. A value still as
acecap last wrote it (OUT/sidecars-written.json holds a digest of each) is acecap's, and what a run has since
redone (a text cut at --max-new-tokens) replaces it, however many runs came between. A tempo, key or time
signature whose confidence is below `min_confidence` is written as unknown, not guessed. Every file is
written whole or not at all.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .lyrics import INSTRUMENTAL
from .writers import atomic_write, to_json

log = logging.getLogger("acecap")

FORMATS = ("acestep", "csv", "acestep-dataset")
JSON_KEYS = ("caption", "bpm", "keyscale", "timesignature", "language", "duration", "is_instrumental", "genre")
UNKNOWN = {"bpm": None, "keyscale": "", "timesignature": "", "language": "unknown"}  # written when not known
WRITTEN = "sidecars-written.json"  # in OUT: what acecap last wrote into each sidecar, as digests


@dataclass
class Song:
    """What the records say about one audio file, across tasks."""

    audio: Path
    relative: Path  # under the input folder it was found in
    caption: str | None = None
    lyrics: str | None = None
    raw_lyrics: str | None = None
    language: str | None = None
    is_instrumental: bool | None = None
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    duration: float | None = None
    genre: str | None = None

    def fields(self) -> dict:
        """The song.json keys that have a value, and the trainer's keys with their unknown value where not."""
        values = {key: getattr(self, key) for key in JSON_KEYS}
        return {key: value if value is not None else UNKNOWN[key] for key, value in values.items()
                if value is not None or key in UNKNOWN}  # fmt: skip


def _confident(record: dict, key: str, min_confidence: float):
    """The record's value, or None when its confidence is below `min_confidence` (tags have confidence 1)."""
    confidence = record.get(f"{key}_confidence")
    return record.get(key) if confidence is None or confidence >= min_confidence else None


def songs_from_records(records: list[dict], relative: dict[str, Path], reviews: dict[str, dict] | None = None,
                       min_confidence: float = 0.0) -> list[Song]:  # fmt: skip
    """One Song per audio file with a successful record or a person's labels, fields from each task's record
    (meta values below `min_confidence` left unknown), then the labels a person set (`reviews`: record path →
    its latest review's edits), which win. An edit equal to the machine's value is none: a withheld value
    stays withheld."""
    songs: dict[str, Song] = {}
    machine: dict[str, dict] = {}  # path → its labels before the threshold
    for record in records:
        if record.get("error") or record["path"] not in relative:
            continue
        song = songs.get(record["path"])
        if song is None:  # one Song (and Path) per file, not one per record
            song = songs[record["path"]] = Song(Path(record["path"]), relative[record["path"]])
        labels = machine.setdefault(record["path"], {})
        song.duration = record.get("duration") or song.duration
        if record["task"] == "caption":
            song.caption = labels["caption"] = record["caption"]
        elif record["task"] == "lyrics":
            song.lyrics, song.raw_lyrics = record["lyrics"], record.get("raw_lyrics")
            song.language, song.is_instrumental = record.get("language"), record.get("is_instrumental")
            labels.update(lyrics=song.lyrics, language=song.language, is_instrumental=song.is_instrumental)
        elif record["task"] == "meta":
            song.bpm, song.keyscale = (_confident(record, key, min_confidence) for key in ("bpm", "keyscale"))
            beats = _confident(record, "timesignature", min_confidence)
            song.timesignature = str(beats) if beats is not None else None
            beats = record.get("timesignature")
            labels.update(bpm=record.get("bpm"), keyscale=record.get("keyscale"),
                          timesignature=str(beats) if beats is not None else None)  # fmt: skip
    for path, edited in (reviews or {}).items():
        if path not in songs:
            if path not in relative or not edited:
                continue
            songs[path] = Song(Path(path), relative[path])  # every task failed, yet a person labelled it
        labels = machine.get(path, {})
        for key, value in edited.items():
            if key not in labels or value != labels[key]:
                setattr(songs[path], key, value)
    return list(songs.values())


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""


def digest(value) -> str:
    """A short digest of a sidecar's text or a song.json value: enough to tell acecap's from a person's."""
    return hashlib.blake2b(to_json(value).encode("utf-8"), digest_size=8).hexdigest()


def load_written(path: Path) -> dict:
    """The sidecars' ledger: sidecar path → digest of the text acecap last wrote (a song.json: key → digest)."""
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # unreadable: every sidecar value then counts as a person's, kept
        log.warning("%s: cannot be read (%s); values in existing sidecars are kept as they are", path, error)
        return {}
    if not isinstance(written, dict):
        log.warning("%s: not a JSON object; values in existing sidecars are kept as they are", path)
        return {}
    return written


def ledger_of(songs: list[Song], folder: Path | None) -> dict:
    """The ledger acecap's export of `songs` would have left: for output folders made before it kept one."""
    written: dict = {}
    for song in songs:
        texts, json_path = _sidecars(song, folder)
        written.update((str(path), digest(text.strip())) for path, text in texts if text is not None)
        written[str(json_path)] = {key: digest(value) for key, value in song.fields().items()}
    return written


def _save_ledger(path: Path, written: dict) -> None:
    """The ledger, rewritten when it changed."""
    text = to_json(written) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        atomic_write(path, text)


def _sidecars(song: Song, folder: Path | None) -> tuple[list[tuple[Path, str | None]], Path]:
    """The song's text sidecars with their texts, and its song.json: beside the audio, or mirrored under `folder`."""
    base = song.audio.with_suffix("") if folder is None else folder / song.relative.with_suffix("")
    texts = [(base.with_name(base.name + ".caption.txt"), song.caption),
             (base.with_name(base.name + ".lyrics.txt"), song.lyrics)]  # fmt: skip
    return texts, base.with_name(base.name + ".json")


def write_sidecars(song: Song, folder: Path | None, overwrite: bool = False, written: dict | None = None) -> list[Path]:
    """song.caption.txt, song.lyrics.txt and song.json beside the audio (or under `folder`, mirrored). `written`:
    the ledger (load_written); a value whose digest it holds is acecap's own to replace, and what this call
    writes goes into it. Without one, every value already there is a person's."""
    written = {} if written is None else written
    texts, path = _sidecars(song, folder)
    paths = []
    for text_path, text in texts:
        if text is None:
            continue
        existing = _text(text_path)
        acecaps = written.get(str(text_path)) == digest(existing)
        if existing == text.strip() or not existing or overwrite or acecaps:
            if existing != text.strip() or not text_path.is_file():
                atomic_write(text_path, text.strip() + "\n")
                paths.append(text_path)
            written[str(text_path)] = digest(text.strip())
    existing: dict = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: not valid JSON; leaving it as it is", path)
            return paths
        if not isinstance(existing, dict):
            log.warning("%s: not a JSON object; leaving it as it is", path)
            return paths
    merged = dict(existing)
    earlier = written.get(str(path))
    earlier = earlier if isinstance(earlier, dict) else {}
    fields = song.fields()
    recorded = {key: value for key, value in earlier.items() if key not in fields}  # a value no record gives now
    for key, value in fields.items():
        empty = existing.get(key) in (None, "", UNKNOWN.get(key))
        unknown = value is None or value == UNKNOWN.get(key)
        acecaps = key in earlier and key in existing and earlier[key] == digest(existing[key])  # may become unknown
        if empty or acecaps or existing.get(key) == value or (overwrite and not unknown):  # a person's never unknown
            merged[key] = value
            recorded[key] = digest(value)
    if merged != existing or not path.is_file():
        atomic_write(path, to_json(merged, indent=2) + "\n")
        paths.append(path)
    written[str(path)] = recorded
    return paths


CSV_HEADER = ["File", "BPM", "Key", "Caption"]


def csv_row(song: Song) -> list:
    """The song's row of the table (File: the audio's name, as the scanner matches it)."""
    return [song.audio.name, "" if song.bpm is None else song.bpm, song.keyscale or "", song.caption or ""]


def utf8_name(song: Song) -> bool:
    """Whether the song's file name is UTF-8, as the scanner reads a csv: one raw byte would fail the whole table."""
    try:
        song.audio.name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the name, held as lone surrogates
        log.warning("%s: not in dataset.csv: its name is not UTF-8, which the table must be; rename it (its "
                    "sidecars and dataset.json entry are written)", song.audio)  # fmt: skip
        return False
    return True


def write_csv(songs: list[Song], path: Path) -> Path:
    """The `File, BPM, Key, Caption` table (of the songs whose names are UTF-8)."""
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerows([CSV_HEADER, *(csv_row(song) for song in songs if utf8_name(song))])
    atomic_write(path, buffer.getvalue())
    return path


def dataset_sample(song: Song, index: int) -> dict:
    """The song's entry in the dataset JSON's `samples`."""
    lyrics = song.lyrics if song.lyrics is not None else ""
    return {
        "id": f"{index:06d}",
        "audio_path": str(song.audio),
        "filename": song.audio.name,
        "caption": song.caption or "",
        "genre": song.genre or "",
        "lyrics": lyrics,
        "raw_lyrics": song.raw_lyrics or "",
        "formatted_lyrics": lyrics,
        "bpm": song.bpm,
        "keyscale": song.keyscale or "",
        "timesignature": song.timesignature or "",
        "duration": song.duration,
        "language": song.language or "unknown",
        "is_instrumental": bool(song.is_instrumental) or lyrics == INSTRUMENTAL,
        "custom_tag": "",
        "labeled": song.caption is not None,
        "prompt_override": None,
    }


def write_dataset(songs: list[Song], path: Path, name: str) -> Path:
    """The ACE-Step UI's dataset JSON: `metadata` and one entry in `samples` per song."""
    samples = [dataset_sample(song, index) for index, song in enumerate(songs)]
    metadata = {
        "name": name,
        "custom_tag": "",
        "tag_position": "prepend",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_samples": len(samples),
        "all_instrumental": bool(samples) and all(s["is_instrumental"] for s in samples),
        "genre_ratio": 0,
    }
    atomic_write(path, to_json({"metadata": metadata, "samples": samples}, indent=2) + "\n")
    return path


_CLASHES = {
    "txt": "-f txt names each file's text after its path without the extension, so these would write one file",
    "acestep": "ACE-Step's scanner finds a song's .caption.txt, .lyrics.txt and .json by its name without the "
    "extension, so these would share them",
    "csv": "ACE-Step's scanner looks a dataset.csv row up by the bare file name (in every subfolder), so these "
    "cannot each have a row",
}
SHOWN_CLASHES = 5  # groups named in the message; the rest counted


def check_collisions(files: list[tuple[Path, Path]], formats: list[str], sidecar_dir: Path | None = None) -> None:
    """Raise ValueError, naming them, when two of `files` ((audio, path under its root) pairs) would write the
    same output in one of `formats` (txt: annotate's OUT/<path>.<task>.txt; acestep; csv)."""
    problems = []
    for fmt in (f for f in _CLASHES if f in formats):
        groups: dict[str, list[Path]] = {}
        for audio, relative in files:
            if fmt == "txt":
                key = relative.with_suffix("").as_posix()
            elif fmt == "acestep":
                base = audio.with_suffix("") if sidecar_dir is None else sidecar_dir / relative.with_suffix("")
                key = os.path.abspath(base)
            else:
                key = audio.name
            groups.setdefault(key, []).append(audio)
        clashes = [paths for paths in groups.values() if len(paths) > 1]
        if clashes:
            shown = "; ".join(" and ".join(map(str, paths)) for paths in clashes[:SHOWN_CLASHES])
            more = f"; and {len(clashes) - SHOWN_CLASHES} more" if len(clashes) > SHOWN_CLASHES else ""
            problems.append(f"-f {fmt}: {_CLASHES[fmt]}: {shown}{more}")
    if problems:
        raise ValueError(". ".join(problems) + ". Rename or move one file of each, annotate them into separate "
                         "output folders, or leave out that -f")  # fmt: skip


def export(
    records: list[dict],
    relative: dict[str, Path],
    formats: list[str],
    output_dir: Path,
    sidecar_dir: Path | None = None,
    overwrite: bool = False,
    reviews: dict[str, dict] | None = None,
    min_confidence: float = 0.0,
    records_before: list[dict] | None = None,
    ledger: Path | None = None,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write the ACE-Step `formats` for every song with a successful record or a person's labels (see
    songs_from_records: reviews win, meta values below `min_confidence` are left unknown): the paths written,
    and (path, reason) for each song or file that could not be (a read-only folder, a name too long), the rest
    going on. Sidecar values still as acecap last wrote them (the `ledger`, default output_dir/WRITTEN) are
    replaced; for a sidecar the ledger does not name (a folder of an older acecap, a dataset moved since), those
    of `records_before` (the records before this run, taken before the threshold: a value written under a
    looser one is acecap's too)."""
    songs = songs_from_records(records, relative, reviews, min_confidence)
    check_collisions([(song.audio, song.relative) for song in songs], formats, sidecar_dir)
    ledger = ledger or output_dir / WRITTEN
    jobs: list[tuple[str, Callable[[], list[Path]]]] = []
    if "acestep" in formats:
        written = ledger_of(songs_from_records(records_before or [], relative, reviews), sidecar_dir)
        written.update(load_written(ledger))
        for song in songs:
            jobs.append((str(song.audio), functools.partial(write_sidecars, song, sidecar_dir, overwrite, written)))
    if "csv" in formats:
        jobs.append((str(output_dir / "dataset.csv"), lambda: [write_csv(songs, output_dir / "dataset.csv")]))
    if "acestep-dataset" in formats:
        path, name = output_dir / "dataset.json", output_dir.resolve().name
        jobs.append((str(path), lambda: [write_dataset(songs, path, name)]))
    paths: list[Path] = []
    failed: list[tuple[str, str]] = []
    try:
        for target, write in jobs:
            try:
                paths += write()
            except OSError as error:
                failed.append((target, error.strerror or str(error)))
    finally:  # what was written is in the ledger even when the export stops part way (Ctrl-C, a kill aside)
        if "acestep" in formats:
            try:
                _save_ledger(ledger, written)
            except OSError as error:
                failed.append((str(ledger), error.strerror or str(error)))
    return paths, failed
