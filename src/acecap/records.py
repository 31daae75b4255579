"""The job's source of truth: append-only JSONL records, and the index that makes a run resumable.

Each process appends whole records to its own file and flushes them to disk after every batch, so a
kill at any moment loses at most the batch in flight. A torn last line (a kill mid-write) is cut off
when the file is next read. At the end of a run all files are merged into `annotations.jsonl`, one
record per input and task, the latest winning.
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
    """Every record of the job in `folder`: the merged file first, then unmerged per-process files."""
    files = [folder / ANNOTATIONS] + sorted(folder.glob(PART_GLOB))
    return [record for path in files if path.is_file() for record in _read(path)]


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
    text = "".join(to_json(r) + "\n" for r in records)
    atomic_write(folder / ANNOTATIONS, text)
    for part in folder.glob(PART_GLOB):
        part.unlink()
    return records


class RecordWriter:
    """Appends records to this process's own file, durably, a batch at a time."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"annotations.part-{name}.jsonl"

    def write(self, records: list[dict]) -> None:
        if records:
            append_lines(self.path, [to_json(r) for r in records])
