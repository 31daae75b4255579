"""The review table's index: one entry per audio file, with the columns it is sorted and filtered by.

Built once from the records and reviews, then held in memory: filters are numpy masks over column
arrays, sorts are cached orders, and a save updates one entry in place, so a page of 100,000 files
answers in milliseconds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .acestep import Song, songs_from_records
from .inputs import shown
from .records import latest_per_input, load_records
from .reviews import FIELDS, audio_path, load_reviews

STATUSES = ("unreviewed", "edited", "approved")  # edited: saved by a person, not yet approved
# cut: stopped at --max-new-tokens; partial: shorter than its header (--allow-partial)
FLAGS = ("error", "truncated", "cut", "repetitive", "partial", "long", "silent", "low_confidence")
LOW_CONFIDENCE = 0.5  # a tempo, key or metre below this is flagged low_confidence
CONFIDENCES = ("bpm", "keyscale", "timesignature")
SORTS = ("path", "duration", "caption", "lyrics", "language", "bpm", "keyscale", "timesignature", "confidence",
         "status")  # fmt: skip
NUMERIC = {"duration", "bpm", "confidence", "status"}
PAGE_SIZES = (25, 50, 100, 200, 500)


@dataclass
class Entry:
    """What the records and the latest review say about one audio file."""

    id: int
    path: str  # as the records name it: the key of its reviews
    shown: str  # the path as the table shows it, under the records' common folder
    duration: float | None
    machine: dict  # FIELDS → the records' values
    confidence: dict  # CONFIDENCES → [0, 1], or None without a meta record
    flags: list[str]
    errors: dict[str, str]  # task → why it failed
    models: dict[str, str]  # task → the model (or analysis library) that wrote it
    review: dict | None = None  # its latest line of reviews.jsonl; its `edits` go over `machine`

    @property
    def audio(self) -> Path:
        return audio_path({"path": self.path})

    @property
    def status(self) -> str:
        if self.review is None:
            return "unreviewed"
        return "approved" if self.review.get("approved") else "edited"

    @property
    def edits(self) -> dict:
        return self.review["edits"] if self.review else {}

    @property
    def fields(self) -> dict:
        """The labels as they stand: the person's where they set one, else the machine's."""
        return {**self.machine, **self.edits}

    def value(self, key: str):
        """One of `fields`, without copying them."""
        edits = self.edits
        return edits[key] if key in edits else self.machine[key]

    @property
    def min_confidence(self) -> float | None:
        values = [v for v in self.confidence.values() if v is not None]
        return min(values) if values else None

    def song(self) -> Song:
        """The ACE-Step view of this file, as exports write it."""
        return Song(self.audio, Path(self.audio.name), duration=self.duration, **self.fields)


@dataclass(frozen=True)
class Query:
    """A view of the table: filters, then an order."""

    status: str | None = None
    flag: str | None = None
    below: float | None = None  # only files with a tempo, key or metre confidence under this
    text: str = ""  # in the path, caption or lyrics, case-insensitive
    sort: str = "path"
    descending: bool = False

    def __post_init__(self) -> None:
        if self.status not in (None, *STATUSES):
            raise ValueError(f"status {self.status!r}: use {', '.join(STATUSES)}")
        if self.flag not in (None, *FLAGS):
            raise ValueError(f"flag {self.flag!r}: use {', '.join(FLAGS)}")
        if self.sort not in SORTS:
            raise ValueError(f"sort {self.sort!r}: use {', '.join(SORTS)}")
        if self.below is not None and not 0 <= self.below <= 1:
            raise ValueError("below: a confidence from 0 to 1")


def _entries(records: list[dict]) -> list[Entry]:
    by_path: dict[str, list[dict]] = {}
    for record in records:
        by_path.setdefault(record["path"], []).append(record)
    # The table needs each song's fields, not where its sidecars would be mirrored: one shared relative path.
    songs = {str(s.audio): s for s in songs_from_records(records, dict.fromkeys(by_path, Path()))}
    paths = list(by_path)
    common = os.path.commonpath(paths) if paths else ""
    if len(paths) == 1 or common in paths:
        common = os.path.dirname(common)
    cut = len(common.rstrip(os.sep)) + 1 if common else 0  # every path starts with common and a separator
    entries = []
    for index, (path, group) in enumerate(sorted(by_path.items())):  # ids by path: the same on every start
        song = songs.get(path)  # record paths are normalised (abspath), as str(Path(path)) is
        meta = next((r for r in group if r["task"] == "meta" and not r.get("error")), {})
        confidence = {key: meta.get(f"{key}_confidence") for key in CONFIDENCES}
        flags = [
            name
            for name, on in (
                ("error", any(r.get("error") for r in group)),
                ("truncated", any(r.get("truncated") for r in group)),
                ("cut", any(r.get("finished") is False for r in group)),
                ("repetitive", any(r.get("repetitive") for r in group)),  # the text ends in a loop
                ("partial", any(r.get("partial") and not r.get("error") for r in group)),  # shorter than its header
                ("long", any(r.get("long") for r in group)),
                ("silent", any(r.get("silent") for r in group)),
                ("low_confidence", any(v is not None and v < LOW_CONFIDENCE for v in confidence.values())),
            )
            if on
        ]
        entries.append(
            Entry(
                id=index,
                path=path,
                shown=shown(path[cut:]),  # a name that is not UTF-8 as \xNN
                duration=next((r["duration"] for r in group if r.get("duration")), None),
                machine={key: getattr(song, key) if song else None for key in FIELDS},
                confidence=confidence,
                flags=flags,
                errors={r["task"]: r["error"] for r in group if r.get("error")},
                models={r["task"]: sys.intern(r.get("model") or "") for r in group},  # a few names, 100,000 times
            )
        )
    return entries


class Catalog:
    """Every file of an annotate output folder, indexed for the review table (read once, at the start)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries = _entries(latest_per_input(load_records(self.folder)))
        reviews = load_reviews(self.folder)
        for entry in self.entries:
            entry.review = reviews.get(entry.path)
        count = len(self.entries)
        self._status = np.zeros(count, np.int8)
        self._flags = np.zeros(count, np.int16)
        self._confidence = np.full(count, np.nan)
        self._text: list[str] = [""] * count
        self._orders: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for entry in self.entries:
            self._index(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def _index(self, entry: Entry) -> None:
        """(Re)compute one entry's columns; sorts are recomputed on next use."""
        fields = entry.fields
        self._status[entry.id] = STATUSES.index(entry.status)
        self._flags[entry.id] = sum(1 << FLAGS.index(name) for name in entry.flags)
        low = entry.min_confidence
        self._confidence[entry.id] = np.nan if low is None else low
        self._text[entry.id] = "\n".join((entry.shown, fields["caption"] or "", fields["lyrics"] or "")).lower()
        self._orders.clear()

    def _sort_value(self, entry: Entry, key: str):
        if key == "path":
            return entry.shown.lower()
        if key == "duration":
            return entry.duration
        if key == "confidence":
            return entry.min_confidence
        if key == "status":
            return STATUSES.index(entry.status)
        value = entry.value(key)
        return value.lower() if isinstance(value, str) else value

    def _order(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids with a value, ascending and stable; ids without one), cached until an entry changes."""
        if key not in self._orders:
            values = [(self._sort_value(entry, key), entry.id) for entry in self.entries]
            present = sorted((v for v in values if v[0] is not None), key=lambda v: v[0])
            missing = [i for value, i in values if value is None]
            self._orders[key] = (np.array([i for _, i in present], np.int64), np.array(missing, np.int64))
        return self._orders[key]

    def select(self, query: Query) -> np.ndarray:
        """Ids of the entries that pass the query's filters, in its order (entries without a value last)."""
        present, missing = self._order(query.sort)
        order = np.concatenate([present[::-1] if query.descending else present, missing])
        keep = np.ones(len(self.entries), bool)
        if query.status is not None:
            keep &= self._status == STATUSES.index(query.status)
        if query.flag is not None:
            keep &= (self._flags & (1 << FLAGS.index(query.flag))) != 0
        if query.below is not None:
            keep &= self._confidence < query.below  # NaN (no confidence) compares False: left out
        text = query.text.strip().lower()
        if text:
            keep &= np.fromiter((text in line for line in self._text), bool, len(self._text))
        return order[keep[order]]

    def counts(self) -> dict[str, int]:
        """Files per status, and in all."""
        per_status = np.bincount(self._status, minlength=len(STATUSES))
        return {"all": len(self.entries), **{s: int(n) for s, n in zip(STATUSES, per_status, strict=True)}}

    def neighbours(self, query: Query, entry_id: int) -> dict:
        """Where an entry stands in a view: its position (from 1, or None when the view leaves it out),
        the view's size, and the ids before and after it."""
        ids = self.select(query)
        found = np.flatnonzero(ids == entry_id)
        if not len(found):
            return {"position": None, "total": len(ids), "previous": None, "next": None}
        at = int(found[0])
        return {
            "position": at + 1,
            "total": len(ids),
            "previous": int(ids[at - 1]) if at > 0 else None,
            "next": int(ids[at + 1]) if at + 1 < len(ids) else None,
        }

    def update(self, entry_id: int, review: dict) -> Entry:
        entry = self.entries[entry_id]
        entry.review = review
        self._index(entry)
        return entry
