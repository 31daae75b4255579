"""What to annotate: folders (recursive, by audio extension), files, and manifests (txt, csv, jsonl)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

AUDIO_EXTENSIONS = {
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma", ".webm",
}  # fmt: skip
_SHOWN_EXTENSIONS = ", ".join(sorted(e.lstrip(".") for e in AUDIO_EXTENSIONS))
MANIFEST_EXTENSIONS = {".txt", ".csv", ".jsonl"}
PATH_COLUMNS = ("path", "audio_path", "file", "filename")


@dataclass(frozen=True)
class Item:
    """One input file, its root (the folder it was found under), and its path under that root: where its
    outputs go under the output folder, and the path its records hold."""

    path: Path
    relative: Path
    error: str | None = None  # why discovery could not use it: a folder it could not list
    root: Path | None = None  # absolute; None: the file's own folder


def shown(path) -> str:
    """A path as any terminal (or JSON) takes it, on one line: bytes of its name that are not UTF-8 written as
    \\xNN, control characters (a newline in a name) as \\n, \\t or \\xNN."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text.translate(_CONTROLS) if any(c < " " or c == "\x7f" for c in text) else text


_CONTROLS = {code: repr(chr(code))[1:-1] for code in (*range(32), 127)}


class ManifestError(ValueError):
    """A manifest that cannot be read, with the reason."""


class InputError(ValueError):
    """Inputs that cannot be annotated at all (missing, or holding no audio), each named: found before any work."""


def _manifest_paths(manifest: Path) -> list[Path]:
    # A name that is not UTF-8 keeps its bytes (surrogateescape, as Python names such files), like a folder's.
    text = manifest.read_text(encoding="utf-8-sig", errors="surrogateescape")
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
                name = next(entry[c] for c in PATH_COLUMNS if c in entry)
            except (json.JSONDecodeError, StopIteration, TypeError):
                raise ManifestError(f"{manifest}:{number}: not a JSON object with a path") from None
            if not isinstance(name, str) or not name.strip():
                raise ManifestError(f"{manifest}:{number}: its path is {json.dumps(name)}, not a file name")
            names.append(name)  # as written: a JSON string may mean its spaces
    # Relative entries are relative to the manifest's folder, so a manifest travels with its data.
    return [p if p.is_absolute() else manifest.parent / p for p in map(Path, names)]


def _walk(folder: Path) -> list[tuple[Path, str | None]]:
    """Audio files under `folder`, symlinked folders followed (an album linked into a collection is part of it)
    but each real folder entered once, so links cannot loop; and each subfolder that could not be listed, with
    why: files in it must not vanish without a word."""
    unlisted: list[OSError] = []
    found, entered = [], set()
    for root, folders, files in os.walk(folder, onerror=unlisted.append, followlinks=True):
        real = os.path.realpath(root)
        if real in entered:  # a link back up the tree, or a second link to one folder
            folders.clear()
            continue
        entered.add(real)
        folders.sort()  # a folder reached twice is named the same way by every run: the first path, in order
        found += [(Path(root) / name, None) for name in files if Path(name).suffix.lower() in AUDIO_EXTENSIONS]
    found += [(Path(e.filename), f"cannot list this folder: {e.strerror or e}") for e in unlisted]
    return sorted(found)


def _expand(entry: Path) -> list[Item]:
    """The files one input names, each under its root: a folder is its files' root; a manifest's folder is
    its entries' root (or the folder it shares with them, when some lie outside it); a file's, its folder."""
    if entry.is_dir():
        root = Path(os.path.abspath(entry))
        return [Item(p, p.relative_to(entry), error, root) for p, error in _walk(entry)]
    if entry.suffix.lower() in MANIFEST_EXTENSIONS and entry.is_file():
        paths = {p: Path(os.path.abspath(p)) for p in _manifest_paths(entry)}
        try:
            root = Path(os.path.commonpath([os.path.abspath(entry.parent), *map(str, paths.values())]))
        except ValueError:  # Windows: entries on other drives have no folder in common
            return [Item(p, Path(p.name), None, absolute.parent) for p, absolute in paths.items()]
        return [Item(p, absolute.relative_to(root), None, root) for p, absolute in paths.items()]
    absolute = Path(os.path.abspath(entry))
    return [Item(entry, Path(entry.name), None, absolute.parent)]


def discover(inputs: list[str | Path]) -> list[Item]:
    """Expand the inputs into files, in a stable order, each listed once. Nothing here raises for one bad
    file: links that loop or lead nowhere and folders that cannot be read become items that say so. An input
    that does not exist, or holds no audio (an empty folder or manifest), raises InputError naming each."""
    items: dict[str, Item] = {}
    problems = []
    for entry in map(Path, inputs):
        if not entry.exists():
            link = f" (a link to {os.readlink(entry)}, which does not exist)" if entry.is_symlink() else ""
            problems.append(f"{entry}: no such file or folder{link}")
            continue
        found = _expand(entry)
        if not found:
            what = "lists no files" if entry.is_file() else f"no audio files in it (looked for {_SHOWN_EXTENSIONS})"
            problems.append(f"{entry}: {what}")
        for item in found:
            items.setdefault(real_path(item.path), item)
    if problems:
        raise InputError("; ".join(problems))
    return list(items.values())


def real_path(path: Path) -> str:
    """The absolute path with symlinks resolved as far as they go (a loop or a NUL does not raise)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return os.path.abspath(path)


def in_shard(item: Item, shard: tuple[int, int] | None) -> bool:
    """Shard `i/N` takes the files whose path under their root hashes to i mod N: stable across runs, and
    across machines that mount the dataset at different places."""
    if shard is None:
        return True
    index, count = shard
    digest = hashlib.sha1(os.fsencode(item.relative.as_posix())).digest()
    return int.from_bytes(digest[:8], "big") % count == index
