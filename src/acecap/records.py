"""The job's source of truth: append-only JSONL records, and the index that makes a run resumable.

Each process appends whole records to its own file and flushes them to disk after every batch, so a
kill at any moment loses at most the batch in flight. A torn last line (a kill mid-write) is cut off
when the file is next read. At the end of a run all files are merged into `annotations.jsonl`, one
record per input and task, the latest winning.

On disk a record names its file by `root` (an id from OUT/roots.json, which maps each id to its absolute
folder once for the whole job) and `path` under that root, so records can be shared without the folders
they came from, and a moved dataset needs one line of roots.json changed. In memory (load_records) every
record's `path` is absolute again. Records of older versions hold an absolute `path` and no `root`: they
are read as they are and stored under a root the next time the folder is merged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .writers import append_lines, atomic_write, to_json

log = logging.getLogger("acecap")

ANNOTATIONS = "annotations.jsonl"
PART_GLOB = "annotations.part-*.jsonl"
ROOTS = "roots.json"


def load_roots(folder: Path) -> dict[str, str]:
    """OUT/roots.json: root id → absolute folder ({} when there is none yet)."""
    path = Path(folder) / ROOTS
    if not path.is_file():
        return {}
    try:
        roots = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        roots = None
    if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
        raise ValueError(f"{path}: not a JSON object of root ids and folders; fix it or remove it")
    return roots


def register_roots(folder: Path, roots: list[Path]) -> dict[str, str]:
    """Add the absolute folders `roots` to OUT/roots.json (each once, named after the folder) and return it all.

    Written whole, then read back: a job starting at the same moment into the same folder (--shard on
    several machines) cannot lose a root to the other's write."""
    wanted = {os.path.abspath(root) for root in roots}
    for _ in range(5):
        current = load_roots(folder)
        missing = sorted(wanted - set(current.values()))
        if not missing:
            return current
        for root in missing:
            name = os.path.basename(root.rstrip(os.sep)) or "root"
            ids = (name if n == 1 else f"{name}-{n}" for n in range(1, len(current) + 2))
            current[next(i for i in ids if i not in current)] = root
        atomic_write(Path(folder) / ROOTS, to_json(current, indent=2) + "\n")
    raise OSError(f"{Path(folder) / ROOTS}: other runs keep rewriting it; run this one again")


class RecordPaths:
    """Records (and reviews) between their form in memory (an absolute `path`) and on disk (`root` and `path`
    under it)."""

    @classmethod
    def of(cls, folder: Path) -> RecordPaths:
        """The forms for the job in `folder`, by its roots.json."""
        return cls(load_roots(folder))

    def __init__(self, roots: dict[str, str]):
        self.roots = roots
        # The longest root first: a file under two roots is stored under the closer one.
        self.prefixes = sorted(((r if r.endswith(os.sep) else r + os.sep, i) for i, r in roots.items()), reverse=True)
        self.unknown: set[str] = set()

    def to_disk(self, record: dict) -> dict:
        path = record["path"]
        for prefix, root in self.prefixes:
            if path.startswith(prefix):
                relative = Path(path[len(prefix) :]).as_posix()
                return {"path": relative, "root": root, **{k: v for k, v in record.items() if k != "path"}}
        return record  # under no root (an older version's record of an input no longer given): kept absolute

    def from_disk(self, record: dict, where: Path) -> dict:
        root = record.get("root")
        if root is None:
            return record
        record = {key: value for key, value in record.items() if key != "root"}
        folder = self.roots.get(root)
        if folder is None:
            if root not in self.unknown:
                self.unknown.add(root)
                log.warning("%s: root %r is not in %s; its records cannot find their files (add %r: "
                            "\"/the/folder\" to it)", where, root, ROOTS, root)  # fmt: skip
            folder = root
        record["path"] = os.path.join(folder, *record["path"].split("/"))
        return record


def file_identity(path: Path) -> dict:
    """Who a file is, cheaply: its absolute path, size and modification time (as rsync compares)."""
    stat = path.stat()
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def done_key(record: dict) -> tuple:
    """Two records with this key describe the same work: same file content, model, task and prompt."""
    return (
        record["path"],
        record.get("size"),
        record.get("mtime_ns"),
        record["model"],
        record["task"],
        record["prompt"],
    )


def _read(path: Path) -> list[dict]:
    """Records of one file; a torn last line is removed from the file, unreadable lines are skipped."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: removing a record cut off by an interrupted run", path)
        with path.open("r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable record", path, number)
    return records


def load_records(folder: Path) -> list[dict]:
    """Every record of the job in `folder`, each `path` absolute: the merged file first, then unmerged
    per-process files."""
    folder = Path(folder)
    files = [folder / ANNOTATIONS] + sorted(folder.glob(PART_GLOB))
    paths = RecordPaths.of(folder)
    return [paths.from_disk(record, path) for path in files if path.is_file() for record in _read(path)]


def completed(records: list[dict]) -> set[tuple]:
    """Keys of the work that finished without error."""
    return {done_key(r) for r in records if not r.get("error")}


def latest_per_input(records: list[dict]) -> list[dict]:
    """One record per (file, task): the last written, in first-seen order."""
    latest: dict[tuple, dict] = {}
    for record in records:
        key = (record["path"], record["task"])
        latest.pop(key, None)
        latest[key] = record
    return list(latest.values())


def merge(folder: Path) -> list[dict]:
    """Fold all per-process files into annotations.jsonl (atomically) and remove them."""
    records = latest_per_input(load_records(folder))
    paths = RecordPaths.of(folder)
    text = "".join(to_json(paths.to_disk(r)) + "\n" for r in records)
    atomic_write(folder / ANNOTATIONS, text)
    for part in folder.glob(PART_GLOB):
        part.unlink()
    return records


class RecordWriter:
    """Appends records to this process's own file, durably, a batch at a time."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"annotations.part-{name}.jsonl"
        self.paths = RecordPaths.of(folder)  # the job's roots were registered before any worker started

    def write(self, records: list[dict]) -> None:
        if records:
            append_lines(self.path, [to_json(self.paths.to_disk(r)) for r in records])
