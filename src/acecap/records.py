"""The job's source of truth: append-only JSONL records, and the index that makes a run resumable.

Each process appends whole records to its own file and flushes them to disk after every batch, so a
kill at any moment loses at most the batch in flight. At the end of a run all files are merged into
`annotations.jsonl`, one record per input and task, the latest winning.

Several runs may share one output folder at once (`--shard i/N` on machines that share a filesystem).
Each holds a lock on its own file while it writes (POSIX record locks, which NFS carries between
machines): a merge folds every file in but removes only those no live run holds, and merges (and
roots.json) are changed under the folder's lock, so one run's merge never drops another's records.
A torn last line (a kill mid-write) is skipped when read and gone when its file is merged.

On disk a record names its file by `root` (an id from OUT/roots.json, which maps each id to its absolute
folder once for the whole job) and `path` under that root, so records can be shared without the folders
they came from, and a moved dataset needs one line of roots.json changed. In memory (load_records) every
record's `path` is absolute again. Records of older versions hold an absolute `path` and no `root`: they
are read as they are and stored under a root the next time the folder is merged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .writers import atomic_write, to_json

log = logging.getLogger("acecap")

ANNOTATIONS = "annotations.jsonl"
PART_GLOB = "annotations.part-*.jsonl"
ROOTS = "roots.json"
LOCK = ".acecap.lock"
_LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_warned_locks = False


def _lock(handle, wait: bool, shared: bool = False) -> bool:
    """Lock the open file whole for this process; False when another process holds it (only without `wait`).
    POSIX locks belong to the process, and closing any descriptor of the file drops them: never nest them.

    A filesystem without locks gives True, with one warning: runs that share the folder are then unsafe."""
    global _warned_locks
    try:
        fcntl.lockf(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if error.errno not in _LOCKS_UNSUPPORTED:
            raise
        if not _warned_locks:
            _warned_locks = True
            log.warning("this filesystem cannot lock files (%s): do not run two jobs into one output folder "
                        "at once", error.strerror)  # fmt: skip
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold the output folder's lock: exclusive to change the job's files (other processes, on any machine
    sharing the folder, wait), shared to read them whole. A reader of a folder it cannot write (or that does not
    exist) reads without it: no run of this process merges there."""
    try:
        handle = open(Path(folder) / LOCK, "a+")  # never removed: a removed lock file lets two in at once
    except OSError:
        if not shared:
            raise
        yield
        return
    with handle:
        _lock(handle, wait=True, shared=shared)
        yield


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

    Under the folder's lock: a job starting at the same moment into the same folder (--shard on several
    machines) cannot lose a root to the other's write."""
    wanted = {os.path.abspath(root) for root in roots}
    with folder_lock(folder):
        current = load_roots(folder)
        missing = sorted(wanted - set(current.values()))
        for root in missing:
            name = os.path.basename(root.rstrip(os.sep)) or "root"
            ids = (name if n == 1 else f"{name}-{n}" for n in range(1, len(current) + 2))
            current[next(i for i in ids if i not in current)] = root
        if missing:
            atomic_write(Path(folder) / ROOTS, to_json(current, indent=2) + "\n")
    return current


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
        if "root" in record:  # read under a root roots.json lacks: kept as it was on disk
            return record
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
        folder = self.roots.get(root)
        if folder is None:  # kept with its root, so that adding the root to roots.json later finds its files
            if root not in self.unknown:
                self.unknown.add(root)
                log.warning("%s: root %r is not in %s; its records cannot find their files (add %r: "
                            "\"/the/folder\" to it)", where, root, ROOTS, root)  # fmt: skip
            return record
        record = {key: value for key, value in record.items() if key != "root"}
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


def _read(path: Path, repair: bool = True) -> list[dict]:
    """Records of one file; unreadable lines are skipped, and a torn last line is removed from the file (with
    `repair`; a live run's file is only read: its last line may still be being written)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # a part file merged away by another run since the folder was listed
        return []
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if repair:
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
    """Every record of the job in `folder`, each `path` absolute (unless its root is not in roots.json): the
    merged file first, then unmerged per-process files, the one last written last. Read under the folder's
    shared lock, so that a merge of another run cannot move records between the two while they are read."""
    with folder_lock(folder, shared=True):
        return _load(Path(folder))


@contextlib.contextmanager
def settled(folder: Path) -> Iterator[list[dict]]:
    """The job's latest record per file and task, with the folder locked while the caller writes what follows
    from them (the ACE-Step files): no other run's merge or export comes between."""
    with folder_lock(folder):
        yield latest_per_input(_load(Path(folder)))


def _load(folder: Path) -> list[dict]:
    paths = RecordPaths.of(folder)
    merged = folder / ANNOTATIONS
    records = [paths.from_disk(record, merged) for record in (_read(merged) if merged.is_file() else [])]
    for part in sorted(folder.glob(PART_GLOB), key=_last_written):  # the latest run's records last
        records += [paths.from_disk(record, part) for record in _read(part, repair=False)]
    return records


def _last_written(part: Path) -> tuple[int, str]:
    try:
        return part.stat().st_mtime_ns, part.name
    except FileNotFoundError:  # merged away since the folder was listed: read as empty
        return 0, part.name


def completed(records: list[dict]) -> set[tuple]:
    """Keys of the work that finished without error."""
    return {done_key(r) for r in records if not r.get("error")}


def latest_per_input(records: list[dict]) -> list[dict]:
    """One record per (file, task): the last written, in first-seen order."""
    latest: dict[tuple, dict] = {}
    for record in records:
        key = (record.get("root"), record["path"], record["task"])  # a root only where roots.json lacks it
        latest.pop(key, None)
        latest[key] = record
    return list(latest.values())


def _finished(part: Path, held: contextlib.ExitStack) -> bool:
    """Whether no live run writes `part` (its lock is taken and kept in `held`)."""
    try:
        handle = held.enter_context(open(part, "r+b"))
    except FileNotFoundError:
        return False
    return _lock(handle, wait=False)


def merge(folder: Path) -> list[dict]:
    """Fold all per-process files into annotations.jsonl (atomically) and remove those of finished runs."""
    folder = Path(folder)
    with folder_lock(folder), contextlib.ExitStack() as held:
        finished = [part for part in sorted(folder.glob(PART_GLOB)) if _finished(part, held)]
        records = latest_per_input(_load(folder))
        paths = RecordPaths.of(folder)
        atomic_write(folder / ANNOTATIONS, "".join(to_json(paths.to_disk(r)) + "\n" for r in records))
        for part in finished:
            part.unlink()
    return records


class RecordWriter:
    """Appends records to this process's own file, durably, a batch at a time, holding the file's lock (so
    another run's merge leaves it be) until closed or the process ends."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"annotations.part-{name}.jsonl"
        self.paths = RecordPaths.of(folder)  # the job's roots were registered before any worker started
        # Locked before it has its name: a merge must never see this file unlocked and take it as finished.
        hidden = folder / f".acecap-{secrets.token_hex(8)}.tmp"
        self.handle = open(hidden, "ab", buffering=0)  # unbuffered: a failed write leaves nothing to flush later
        _lock(self.handle, wait=True)
        os.replace(hidden, self.path)

    def write(self, records: list[dict]) -> None:
        if records:
            text = "".join(to_json(self.paths.to_disk(r)) + "\n" for r in records)
            data = memoryview(text.encode("utf-8", errors="surrogateescape"))
            while data:
                data = data[self.handle.write(data) :]
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
