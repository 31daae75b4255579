"""Tempo, key and time signature of a song (the `meta` task; no model): from its tags, else from the signal.

ACE-Step's trainer conditions on `bpm`, `keyscale` and `timesignature`, and its own tutorial warns that
language-model labels get them wrong. A library's tags (tags.py) are read first: what a person or a DJ tool
wrote is taken as given (confidence 1). What the tags lack is estimated from the signal: tempo and metre by
rhythm.py, the key by tonality.py. Each value records its source and a confidence in [0, 1]; accuracy on
material of known tempo, key and metre is measured by `benchmarks/meta.py` (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import rhythm, tags, tonality
from .audio import SAMPLE_RATE

PITCHES = tonality.PITCHES
SOURCES = ("tags", "signal")
ESTIMATOR = "acecap-meta 5"  # the records' `model` for this task: a new estimator is a new model (re-run)
SHORTEST_S = 4.0  # below this there are too few beats to say anything
SILENT_PEAK = 1e-4


@dataclass(frozen=True)
class Meta:
    duration: float
    bpm: int | None
    bpm_confidence: float
    keyscale: str | None  # "C major", "F# minor"
    keyscale_confidence: float
    timesignature: int | None  # beats per bar as ACE-Step writes it: 4 (4/4), 3 (3/4), 6 (6/8)
    timesignature_confidence: float
    bpm_source: str | None = None  # "tags" or "signal"
    keyscale_source: str | None = None
    timesignature_source: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # the tags read, as written

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """'96 BPM, D major, 3/4', or what was found of it."""
        found = [
            f"{self.bpm} BPM" if self.bpm else None,
            self.keyscale,
            {4: "4/4", 3: "3/4", 6: "6/8"}.get(self.timesignature) if self.timesignature else None,
        ]
        return ", ".join(f for f in found if f) or "no tempo or key"


def analyse(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Meta:
    """Tempo, key and metre of mono float samples at 16 kHz from the signal alone; None (confidence 0)
    where the clip is too short or silent."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"analyse expects {SAMPLE_RATE} Hz samples (acecap.audio.load_audio), not {sample_rate}")
    samples = np.asarray(samples, dtype=np.float32)
    duration = round(len(samples) / SAMPLE_RATE, 3)
    if duration < SHORTEST_S or not np.any(np.abs(samples) > SILENT_PEAK):
        return Meta(duration, None, 0.0, None, 0.0, None, 0.0)
    chroma = tonality.chroma(samples)
    ratio = rhythm.HOP / tonality.HOP

    def harmony(beats: np.ndarray) -> np.ndarray:
        return tonality.changes(chroma, np.round(beats * ratio).astype(int))

    found = rhythm.analyse(samples, harmony)
    key, key_confidence = tonality.key(chroma)
    return Meta(
        duration=duration,
        bpm=int(round(found.bpm)) if found.bpm else None,
        bpm_confidence=_estimated(found.bpm_confidence),
        keyscale=key,
        keyscale_confidence=_estimated(key_confidence),
        timesignature=found.beats_per_bar,
        timesignature_confidence=_estimated(found.metre_confidence),
        bpm_source="signal" if found.bpm else None,
        keyscale_source="signal",
        timesignature_source="signal" if found.beats_per_bar else None,
    )


def _estimated(confidence: float) -> float:
    """An estimate's confidence, rounded, and below 1: only a tag is taken as certain."""
    return min(round(float(confidence), 3), 0.999)


def describe(path: str | Path, samples: np.ndarray, sources: tuple[str, ...] = SOURCES) -> Meta:
    """Tempo, key and metre of one file: from its tags where `sources` has "tags" and they carry a value,
    else from the signal where it has "signal". Tags have no time signature, so that is always the signal's."""
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"meta sources {sources!r}: use tags, signal or both")
    tagged = tags.read(path) if "tags" in sources else tags.Tagged(None, None, {})
    duration = round(len(samples) / SAMPLE_RATE, 3)
    heard = analyse(samples) if "signal" in sources else Meta(duration, None, 0.0, None, 0.0, None, 0.0)
    bpm_from_tags, key_from_tags = tagged.bpm is not None, tagged.keyscale is not None
    return Meta(
        duration=duration,
        bpm=tagged.bpm if bpm_from_tags else heard.bpm,
        bpm_confidence=1.0 if bpm_from_tags else heard.bpm_confidence,
        keyscale=tagged.keyscale if key_from_tags else heard.keyscale,
        keyscale_confidence=1.0 if key_from_tags else heard.keyscale_confidence,
        timesignature=heard.timesignature,
        timesignature_confidence=heard.timesignature_confidence,
        bpm_source="tags" if bpm_from_tags else heard.bpm_source,
        keyscale_source="tags" if key_from_tags else heard.keyscale_source,
        timesignature_source=heard.timesignature_source,
        tags=tagged.found,
    )
