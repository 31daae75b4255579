"""Reviews: the labels a person checked and corrected, kept beside the machine's records.

`OUT/reviews.jsonl` is append-only, one line per save: the record path, whether the labels were approved,
and the labels the person set to something other than the machine's value (`edits`; None: cleared). The
latest line per file wins and annotations.jsonl is never touched. A label the person left as it was follows
the machine, so what a later run redoes (a longer caption, a new task) still reaches the dataset. A save also
goes into the ACE-Step files that already exist for the song (its sidecars at once, OUT/dataset.csv and
OUT/dataset.json in the background), and `annotate -f ...` applies reviews over records, so a re-run of
annotate keeps every edit.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from .acestep import CSV_HEADER, UNKNOWN, WRITTEN, Song, csv_row, dataset_sample, export, write_sidecars
from .inputs import shown
from .lyrics import INSTRUMENTAL
from .records import RecordPaths, _read, latest_per_input, load_records, settled
from .writers import append_lines, atomic_write, to_json

log = logging.getLogger("acecap")

REVIEWS = "reviews.jsonl"
FIELDS = ("caption", "lyrics", "bpm", "keyscale", "timesignature", "language", "is_instrumental")
EXPORTS = ("approved", "all")  # which songs `acecap review OUT --export` writes
BPM_RANGE = (30, 300)  # what ACE-Step 1.5 generates; a value outside is a typo
TEXT_LIMIT = 20_000  # characters: far above a caption (256 tokens in training) or a song's lyrics
KEYSCALE = re.compile(r"^([a-g])([#b♯♭]?)\s*(major|minor|maj|min)$", re.IGNORECASE)
TIMESIGNATURE = re.compile(r"^([1-9]|1[0-6])(/(1|2|4|8|16))?$")
LANGUAGE = re.compile(r"^([a-z]{2,3}(-[a-z0-9]{2,8})?|unknown)$")


def audio_path(record: dict) -> Path:
    """The audio file a record (or review) describes: the one place review reads a record's path."""
    return Path(record["path"])


def load_reviews(folder: Path) -> dict[str, dict]:
    """The latest review of each file (by record path); a line that is not a review is skipped, loudly."""
    path = Path(folder) / REVIEWS
    paths = RecordPaths.of(folder)
    latest: dict[str, dict] = {}
    for number, review in enumerate(_read(path) if path.is_file() else [], 1):
        if not (isinstance(review, dict) and isinstance(review.get("path"), str)
                and isinstance(review.get("edits", review.get("fields")), dict)):  # fmt: skip
            log.warning("%s: review %d is not {path, approved, edits}; skipped", path, number)
            continue
        if "edits" not in review:  # written before 2026-11-29: all seven labels; an empty one was mostly a task not
            fields = review.pop("fields")  # run yet, an unticked 'instrumental' the box's default
            review["edits"] = {key: value for key, value in fields.items() if value not in (None, False)}
        review = paths.from_disk(review, path)
        latest[review["path"]] = review
    return latest


def reviewed_edits(folder: Path) -> dict[str, dict]:
    """Record path → the labels its latest review set: what ACE-Step exports put over the records."""
    return {path: review["edits"] for path, review in load_reviews(folder).items()}


def _text(key: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be text")
    if len(value) > TEXT_LIMIT:
        raise ValueError(f"{key}: longer than {TEXT_LIMIT} characters")
    return value.strip() or None


def _bpm(value) -> int | None:
    if value is None or value == "":
        return None
    number = value
    if isinstance(value, str):
        number = float(value) if re.fullmatch(r"\s*\d+(\.0*)?\s*", value) else None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number % 1:
        raise ValueError(f"bpm: {value!r} is not a whole number")
    if not BPM_RANGE[0] <= number <= BPM_RANGE[1]:
        raise ValueError(f"bpm: {int(number)} is outside {BPM_RANGE[0]}-{BPM_RANGE[1]}")
    return int(number)


def _keyscale(value) -> str | None:
    text = _text("keyscale", value)
    if text is None:
        return None
    match = KEYSCALE.match(text)
    if not match:
        raise ValueError(f"keyscale: {text!r} is not a key like 'C major' or 'F# minor'")
    note, accidental, mode = match.groups()
    accidental = {"♯": "#", "♭": "b", "B": "b"}.get(accidental, accidental)
    return f"{note.upper()}{accidental} {'major' if mode.lower().startswith('maj') else 'minor'}"


def _timesignature(value) -> str | None:
    text = _text("timesignature", None if value is None else str(value))
    if text is not None and not TIMESIGNATURE.match(text):
        raise ValueError(f"timesignature: {text!r} is not beats per bar (3, 4) or a metre (6/8)")
    return text


def _language(value) -> str | None:
    text = _text("language", value)
    if text is not None and not LANGUAGE.match(text.lower()):
        raise ValueError(f"language: {text!r} is not an ISO code (en, zh, pt-br) or 'unknown'")
    return None if text is None else text.lower()


def check_fields(given: dict, current: dict) -> dict:
    """`current` with the person's `given` fields, each checked and written the way ACE-Step reads it.

    Raises ValueError naming the field and the reason, so bad input never lands in a dataset."""
    if not isinstance(given, dict):
        raise ValueError("fields: must be an object")
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}: the fields are {', '.join(FIELDS)}")
    fields = {key: current.get(key) for key in FIELDS}
    checks = {"caption": lambda v: _text("caption", v), "lyrics": lambda v: _text("lyrics", v), "bpm": _bpm,
              "keyscale": _keyscale, "timesignature": _timesignature, "language": _language}  # fmt: skip
    for key, value in given.items():
        if key == "is_instrumental":
            if value is not None and not isinstance(value, bool):
                raise ValueError("is_instrumental: must be true or false")
            fields[key] = value
        else:
            fields[key] = checks[key](value)
    if fields["is_instrumental"] and fields["lyrics"] is None:
        fields["lyrics"] = INSTRUMENTAL  # what ACE-Step expects of a song without words
    return fields


def _plain(key: str, value):
    """A label as check_fields writes it: text stripped, an unticked 'instrumental' the same as not known."""
    if key == "is_instrumental":
        return bool(value)
    return value.strip() or None if isinstance(value, str) else value


def changes(fields: dict, before: dict) -> dict:
    """The fields whose value differs from `before` (both as check_fields writes them)."""
    return {key: value for key, value in fields.items() if _plain(key, value) != _plain(key, before.get(key))}


def append_review(folder: Path, path: str, edited: dict, approved: bool) -> dict:
    """Add one review line (whole, flushed to disk) and return it. `edited`: the labels the person set to
    something other than the machine's value."""
    review = {
        "path": path,
        "approved": approved,
        "edits": {key: edited[key] for key in FIELDS if key in edited},
        "reviewed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    append_lines(Path(folder) / REVIEWS, [to_json(RecordPaths.of(folder).to_disk(review))])  # path as records store it
    return review


def write_sidecar_changes(song: Song, changed: dict) -> list[Path]:
    """The fields a person changed, into the song's sidecars (replacing what is there), if it has any:
    making sidecars is annotate -f acestep's choice. The paths written."""
    if not changed:
        return []
    base = song.audio.with_suffix("")
    caption, lyrics, sidecar = (base.with_name(base.name + s) for s in (".caption.txt", ".lyrics.txt", ".json"))
    if not (caption.is_file() or lyrics.is_file() or sidecar.is_file()):
        return []
    values = {key: value for key, value in changed.items() if value is not None}
    written = write_sidecars(Song(song.audio, Path(song.audio.name), **values), None, overwrite=True)
    for key, path in (("caption", caption), ("lyrics", lyrics)):
        if key in changed and changed[key] is None and path.is_file():
            atomic_write(path, "")  # cleared by the person: kept empty, so annotate does not refill it
            written.append(path)
    cleared = [key for key, value in changed.items() if value is None]
    if cleared and sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return written  # write_sidecars has warned about it
        if not isinstance(data, dict):
            return written
        # A cleared key the trainer reads takes its 'not known' value; the others leave.
        kept = {key: UNKNOWN[key] if key in cleared else value for key, value in data.items()
                if key not in cleared or key in UNKNOWN}  # fmt: skip
        if kept != data:
            atomic_write(sidecar, to_json(kept, indent=2) + "\n")
            written.append(sidecar)
    return written


CSV_COLUMNS = {"bpm": 1, "keyscale": 2, "caption": 3}  # the labels dataset.csv holds, by column
SAMPLE_KEYS = {"caption": ("caption", "labeled"), "lyrics": ("lyrics", "formatted_lyrics", "is_instrumental"),
               "is_instrumental": ("is_instrumental",), "bpm": ("bpm",), "keyscale": ("keyscale",),
               "timesignature": ("timesignature",), "language": ("language",)}  # fmt: skip


def _update_csv(path: Path, saves: list[tuple[Song, dict]]) -> None:
    """The changed cells of the songs' rows in an existing dataset.csv (the others stay as annotate wrote them,
    under its --meta-min-confidence); a name the table holds twice is left alone."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows or rows[0] != CSV_HEADER:
        log.warning("%s: not a File, BPM, Key, Caption table; not changed", path)
        return
    where: dict[str, list[int]] = {}
    for index, row in enumerate(rows[1:], 1):
        if row:
            where.setdefault(row[0], []).append(index)
    for song, changed in saves:
        new = csv_row(song)
        found = where.get(new[0], [])
        if len(found) > 1:
            log.warning("%s: %d rows name %s; not changed (edit it by hand)", path, len(found), new[0])
        elif found:
            row = rows[found[0]] + [""] * (len(CSV_HEADER) - len(rows[found[0]]))
            for key in changed.keys() & CSV_COLUMNS.keys():
                row[CSV_COLUMNS[key]] = str(new[CSV_COLUMNS[key]])
            rows[found[0]] = row
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    atomic_write(path, buffer.getvalue())


def _update_dataset(path: Path, saves: list[tuple[Song, dict]]) -> None:
    """The changed keys of the songs' samples in an existing dataset JSON, found by path, or else by a file name
    that only one sample has (the songs were moved since)."""
    try:
        dataset = json.loads(path.read_text(encoding="utf-8"))
        samples = dataset["samples"]
        by_path = {sample["audio_path"]: sample for sample in samples}
        by_name: dict[str, list[dict]] = {}
        for sample in samples:
            by_name.setdefault(sample["filename"], []).append(sample)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        log.warning("%s: not an ACE-Step dataset file; not changed", path)
        return
    for song, changed in saves:
        named = by_name.get(song.audio.name, [])
        sample = by_path.get(str(song.audio)) or (named[0] if len(named) == 1 else None)
        if sample is None:
            log.warning("%s: no sample is %s; not changed", path, shown(song.audio))
            continue
        new = dataset_sample(song, 0)
        sample.update({key: new[key] for field in changed for key in SAMPLE_KEYS[field]})
    dataset.setdefault("metadata", {})["all_instrumental"] = all(s.get("is_instrumental") for s in samples)
    atomic_write(path, to_json(dataset, indent=2) + "\n")


class DatasetFiles:
    """Carries saves into OUT/dataset.csv and OUT/dataset.json, where they exist, from a background thread:
    rewriting the files of 100,000 songs takes seconds, so a save never waits for it, and the saves that
    arrive meanwhile are written together. close() writes whatever is still pending."""

    NAMES = (("dataset.csv", _update_csv), ("dataset.json", _update_dataset))

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._pending: dict[str, tuple[Song, dict]] = {}  # audio path → the song, and the labels saves changed
        self._busy = self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="acecap-dataset-files", daemon=True)
        self._thread.start()

    def add(self, song: Song, changed: dict) -> list[str]:
        """Queue the song's `changed` labels (its other values as they stand); the names of the files they will
        go into."""
        names = [name for name, _ in self.NAMES if (self.folder / name).is_file()] if changed else []
        if names:
            with self._changed:
                earlier = self._pending.get(str(song.audio), (song, {}))[1]
                self._pending[str(song.audio)] = (song, {**earlier, **changed})
                self._changed.notify_all()
        return names

    def wait(self) -> None:
        """Return once everything added so far is written."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending and not self._busy)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                saves, self._pending, self._busy = list(self._pending.values()), {}, True
            try:
                for name, update in self.NAMES:
                    if (self.folder / name).is_file():
                        update(self.folder / name, saves)
            except (OSError, ValueError) as error:  # the reviews themselves are saved; annotate -f rewrites these
                log.warning("%s: could not update the dataset files: %s", self.folder, error)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()


def export_reviewed(folder: Path, which: str, formats: list[str], output_dir: Path | None = None,
                    min_confidence: float = 0.3) -> tuple[list[Path], list[tuple[str, str]]]:  # fmt: skip
    """The ACE-Step `formats` for the approved songs (`which="approved"`) or all of them, reviews applied: the
    paths written, and (path, reason) for each that could not be.

    Sidecars go beside each song (values already in them are kept, as annotate does); dataset.csv and
    dataset.json into `output_dir` (default `folder`). A machine's tempo, key or metre below `min_confidence`
    is written as unknown, as annotate writes it; a value a person changed is written as changed."""
    if which not in EXPORTS:
        raise ValueError(f"--export {which!r}: use {' or '.join(EXPORTS)}")
    if not formats:
        raise ValueError("--export needs at least one -f: acestep, csv or acestep-dataset")
    if "acestep" in formats:  # sidecars and their ledger: changed under the folder's lock, as annotate's exports
        with settled(Path(folder)) as records:
            return _export_reviewed(folder, records, which, formats, output_dir, min_confidence)
    return _export_reviewed(folder, latest_per_input(load_records(Path(folder))), which, formats, output_dir,
                            min_confidence)  # fmt: skip


def _export_reviewed(folder: Path, records: list[dict], which: str, formats: list[str], output_dir: Path | None,
                     min_confidence: float) -> tuple[list[Path], list[tuple[str, str]]]:  # fmt: skip
    reviews = load_reviews(folder)
    if not records:
        raise ValueError(f"{folder}: no annotate records here (annotations.jsonl); run acecap annotate first")
    if which == "approved":
        records = [r for r in records if reviews.get(r["path"], {}).get("approved")]
        if not records:
            raise ValueError(f"no song of {folder} is approved yet: approve some in `acecap review {folder}` first")
    relative = {r["path"]: Path(audio_path(r).name) for r in records}
    edited = {path: review["edits"] for path, review in reviews.items()}
    ledger = Path(folder) / WRITTEN  # the sidecars beside the songs are annotate's: so is the ledger of them
    return export(records, relative, formats, Path(output_dir or folder), reviews=edited,
                  min_confidence=min_confidence, ledger=ledger)  # fmt: skip
