"""What to annotate: folders (recursive, by audio extension), files, and manifests (txt, csv, jsonl)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm",
}  # fmt: skip
MANIFEST_EXTENSIONS = {".txt", ".csv", ".jsonl"}
PATH_COLUMNS = ("path", "audio_path", "file", "filename")


@dataclass(frozen=True)
class Item:
    """One input file, and where its outputs go relative to the output folder."""

    path: Path
    relative: Path


class ManifestError(ValueError):
    """A manifest that cannot be read, with the reason."""


def _manifest_paths(manifest: Path) -> list[Path]:
    text = manifest.read_text(encoding="utf-8-sig")
    kind = manifest.suffix.lower()  # discover() takes LIST.TXT as a manifest too
    if kind == ".txt":
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    elif kind == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        columns = {name.strip().lower(): name for name in (rows[0].keys() if rows else [])}
        column = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
        if column is None:
            raise ManifestError(f"{manifest}: no path column (one of {', '.join(PATH_COLUMNS)})")
        names = [row[column].strip() for row in rows if row[column] and row[column].strip()]
    else:
        names = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                names.append(next(str(entry[c]) for c in PATH_COLUMNS if c in entry))
            except (json.JSONDecodeError, StopIteration, TypeError):
                raise ManifestError(f"{manifest}:{number}: not a JSON object with a path") from None
    # Relative entries are relative to the manifest's folder, so a manifest travels with its data.
    return [p if p.is_absolute() else manifest.parent / p for p in map(Path, names)]


def discover(inputs: list[str | Path]) -> list[Item]:
    """Expand the inputs into files, in a stable order, each listed once."""
    items: dict[Path, Item] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and not p.is_dir())
            pairs = [(p, p.relative_to(entry)) for p in found]
        elif entry.suffix.lower() in MANIFEST_EXTENSIONS and entry.is_file():
            pairs = [(p, Path(p.name)) for p in _manifest_paths(entry)]
        else:  # a file, or a path that does not exist: reading it will say what is wrong
            pairs = [(entry, Path(entry.name))]
        for path, relative in pairs:
            items.setdefault(path.resolve(), Item(path=path, relative=relative))
    return list(items.values())


def in_shard(item: Item, shard: tuple[int, int] | None) -> bool:
    """Shard `i/N` takes the files whose path hashes to i mod N: stable across machines and runs."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.sha1(str(item.path.resolve()).encode()).digest()
    return int.from_bytes(digest[:8], "big") % count == index
