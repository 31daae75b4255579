"""Tempo and key a music library already wrote into a file's tags.

Read with PyAV (FFmpeg's demuxers: ID3v2 in mp3, aiff and wav; Vorbis comments in flac, ogg and opus; MP4
and M4A metadata), so no tagging library is needed. FFmpeg does not surface MP4's integer `tmpo` atom, so
that one is read from the file's box tree directly.

Tag names: tempo in ID3 `TBPM`, Vorbis/FLAC `BPM` or `TEMPO`, MP4 `tmpo` or iTunes' `----:…:BPM`; key in ID3
`TKEY`, `INITIALKEY` (Traktor, Rekordbox, Mixed In Key as TXXX), Vorbis `INITIALKEY` or `KEY`, MP4
`----:com.apple.iTunes:initialkey`. Key notations: `Am`, `A minor`, `A min`, `F#m`, `Gb`, `B♭m`, Camelot
`8A` (A minor) / `8B` (C major), Open Key `1d` (C major) / `1m` (A minor), and pairs like `8A - Am`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
BPM_TAGS = ("TBPM", "BPM", "TEMPO", "TMPO")
KEY_TAGS = ("TKEY", "INITIALKEY", "INITIAL KEY", "KEY")
BPM_RANGE = (30, 300)  # what ACE-Step accepts; anything else in a tag is a mistake, not a tempo
NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_NOTE = re.compile(r"^([a-g])\s*(#|b|♯|♭|-?sharp|-?flat)?\s*(m|min|minor|maj|major)?$", re.IGNORECASE)
_WHEEL = re.compile(r"^(1[0-2]|0?[1-9])\s*([abdm])$", re.IGNORECASE)


@dataclass(frozen=True)
class Tagged:
    bpm: int | None
    keyscale: str | None  # "F# minor"
    found: dict[str, str]  # the tags these came from, as written: {"TBPM": "128", "TKEY": "F#m"}


def parse_bpm(text: str) -> int | None:
    """'128', '92.5', '92,5', '128 BPM' → a whole tempo; None for 0, junk or a tempo outside 30–300."""
    match = re.match(r"\s*(\d+(?:[.,]\d+)?)", text or "")
    if not match:
        return None
    bpm = int(float(match.group(1).replace(",", ".")) + 0.5)  # 92.5 is 93, not Python's banker's 92
    return bpm if BPM_RANGE[0] <= bpm <= BPM_RANGE[1] else None


def parse_key(text: str) -> str | None:
    """A key in any common notation → 'F# minor' (sharps, as acecap writes keys); None when unreadable or
    'o' (ID3's off-key)."""
    for part in re.split(r"\s*[/|,;()]\s*|\s+-\s+", (text or "").strip()):
        found = _parse_one(part.strip())
        if found:
            return found
    return None


def _parse_one(text: str) -> str | None:
    wheel = _WHEEL.match(text)
    if wheel:
        number, letter = int(wheel.group(1)), wheel.group(2).upper()
        if letter in "AB":  # Camelot: 8A is A minor, 8B C major; each step is a fifth
            minor = (9 + 7 * (number - 8)) % 12
            return f"{PITCHES[minor]} minor" if letter == "A" else f"{PITCHES[(minor + 3) % 12]} major"
        major = 7 * (number - 1) % 12  # Open Key: 1d is C major, 1m A minor
        return f"{PITCHES[major]} major" if letter == "D" else f"{PITCHES[(major + 9) % 12]} minor"
    note = _NOTE.match(text)
    if not note:
        return None
    tonic = NATURALS[note.group(1).upper()]
    accidental = (note.group(2) or "").lower().lstrip("-")
    tonic += 1 if accidental in ("#", "♯", "sharp") else -1 if accidental in ("b", "♭", "flat") else 0
    mode = (note.group(3) or "").lower()
    minor = mode in ("m", "min", "minor")
    return f"{PITCHES[tonic % 12]} {'minor' if minor else 'major'}"


def read(path: str | Path) -> Tagged:
    """The tempo and key in a file's tags (None where absent or unreadable; never raises)."""
    found = _metadata(Path(path))
    bpm = keyscale = None
    used: dict[str, str] = {}
    for name in BPM_TAGS:
        if name in found and bpm is None:
            bpm = parse_bpm(found[name])
            used[name] = found[name]
    for name in KEY_TAGS:
        if name in found and keyscale is None:
            keyscale = parse_key(found[name])
            used[name] = found[name]
    return Tagged(bpm, keyscale, used)


def _metadata(path: Path) -> dict[str, str]:
    """Container and audio-stream metadata, names upper-cased; MP4's tmpo added as TMPO."""
    import av

    found: dict[str, str] = {}
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            streams = [stream.metadata for stream in container.streams.audio]
            for metadata in (container.metadata, *streams):
                for name, value in metadata.items():
                    found.setdefault(name.upper(), str(value))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        return {}
    tempo = _mp4_tmpo(path)
    if tempo is not None:
        found.setdefault("TMPO", str(tempo))
    return found


def _boxes(handle, end: int):
    """(type, payload start, payload end) of each MP4 box from the handle's position up to `end`."""
    while handle.tell() + 8 <= end:
        start = handle.tell()
        size, kind = struct.unpack(">I4s", handle.read(8))
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", handle.read(8))[0], 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            return
        yield kind, start + header, start + size
        handle.seek(start + size)


def _mp4_tmpo(path: Path) -> int | None:
    """The integer in moov/udta/meta/ilst/tmpo, if the file is an MP4 that has one."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return None
            handle.seek(0, 2)
            total = handle.tell()
            handle.seek(0)
            span = (0, total)
            for wanted, skip in ((b"moov", 0), (b"udta", 0), (b"meta", 4), (b"ilst", 0), (b"tmpo", 0)):
                handle.seek(span[0])
                found = next(((a, b) for kind, a, b in _boxes(handle, span[1]) if kind == wanted), None)
                if found is None:
                    return None
                span = (found[0] + skip, found[1])
            handle.seek(span[0])
            for kind, start, end in _boxes(handle, span[1]):
                if kind == b"data" and end - start > 8:
                    handle.seek(start + 8)  # type indicator and locale
                    return int.from_bytes(handle.read(end - start - 8), "big")
    except (OSError, struct.error):
        return None
    return None
