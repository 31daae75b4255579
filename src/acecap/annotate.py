"""`acecap annotate`: label whole collections, batched by length, resumable, on one or several devices.

The main process finds the inputs, drops what earlier runs finished, and deals the rest out in chunks
through a queue; each worker (worker.py: a thread for one device, a process per device for several, or a
Ray actor per card, cluster.py) loads the model once, decodes its files ahead of the device in worker
processes (pipeline.py), captions them by continuous batching and writes each file's record as its clip
ends. A slow device simply takes fewer chunks.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import devices
from .acestep import check_collisions
from .cluster import run_on_ray
from .inputs import Item, discover, in_shard
from .job import CHUNK_FILES, Job
from .progress import Progress, Summary
from .records import done_key, file_identity, load_records, merge, register_roots
from .worker import sidecar_path, worker_main
from .writers import atomic_write, check_writable

log = logging.getLogger("acecap")


def _restore_sidecar(job: Job, record: dict, relative: Path) -> bool:
    """A finished file whose .txt is missing or says other than its record (-f txt added to a finished job, a
    file deleted, a redo by a run without -f txt) gets it from its record. Whether it was written; OSError when
    it cannot be."""
    path, text = sidecar_path(job, relative), record[job.task] + "\n"
    try:
        if path.read_bytes() == text.encode("utf-8", "surrogateescape"):
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, text)
    return True


def _cut_shorter(record: dict, job: Job) -> bool:
    """A text (or a segment's) cut at a --max-new-tokens below this run's: redone, now that it may finish."""
    if job.task == "meta":
        return False
    texts = record.get("segments") or [record]
    return any(t.get("finished") is False and (t.get("tokens") or 0) < job.decoding.max_new_tokens for t in texts)


READS = {"truncate": 0, "full": 1, "segment": 2}  # how much of a long file each --long-audio reads, in order


def _cut_earlier(record: dict, job: Job) -> bool:
    """A file cut short, of which this run would caption more: --long-audio full after truncate, segment (an hour)
    after either, or a longer --max-duration. Not again under the same settings, nor by a run reading less."""
    if job.task == "meta" or not record.get("truncated"):
        return False
    mode = record.get("long_audio", "truncate")  # records before 2026-11-29 name neither
    if READS[job.long_audio] != READS[mode]:
        return READS[job.long_audio] > READS[mode]
    return mode == "truncate" and job.max_duration > (record.get("max_duration") or float("inf"))


def plan(job: Job) -> tuple[list[Item], int]:
    """The inputs still to do, and how many an earlier run already finished. Inputs that do not exist or hold
    no audio, two files whose -f txt outputs would be one file, and an output folder that cannot be written,
    raise here: before any model loads."""
    found = discover(job.inputs)
    if job.write_txt:  # every shard's files: shards share the output folder
        check_collisions([(item.path, item.relative) for item in found], ["txt"])
    items = [item for item in found if in_shard(item, job.shard)]
    check_writable(job.output_dir)
    register_roots(job.output_dir, sorted({item.root or Path(os.path.abspath(item.path)).parent for item in items}))
    records = [] if job.overwrite else load_records(job.output_dir)
    done = {done_key(record): record for record in records if not record.get("error")}
    pending, restored = [], 0
    for item in items:
        try:
            identity = file_identity(item.path)
        except (OSError, ValueError):
            pending.append(item)  # reading it will record why it cannot be read
            continue
        record = done.get(done_key({**identity, "model": job.model_name, "task": job.task, "prompt": job.prompt_text}))
        if record is None or item.error or _cut_shorter(record, job) or _cut_earlier(record, job):
            pending.append(item)
        elif job.write_txt:
            try:
                restored += _restore_sidecar(job, record, item.relative)
            except OSError as error:  # done again, so that its failure is recorded and counted
                log.warning("%s: cannot write its .%s.txt: %s", item.path, job.task, error.strerror or error)
                pending.append(item)
    if restored:
        log.info("%d .%s.txt files written from earlier records", restored, job.task)
    return pending, len(items) - len(pending)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Processes started in here ignore Ctrl-C from their first instruction (an ignored signal stays ignored
    through exec, and Python then leaves it so), so only the main process handles it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _start_workers(job: Job, run_id: str, pending: list[Item], stop):
    """One thread for a single device; one spawned process per device for several (torch.multiprocessing)."""
    in_process = len(job.devices) > 1
    if in_process:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")  # CUDA and NPU runtimes cannot be forked
        work, events, runner = context.Queue(), context.Queue(), context.Process
    else:
        work, events, runner = queue.Queue(), queue.Queue(), threading.Thread
        devices.share_malloc_arena()
    size = max(1, min(CHUNK_FILES, -(-len(pending) // len(job.devices))))  # a small job still reaches every device
    for begin in range(0, len(pending), size):
        work.put(pending[begin : begin + size])
    for _ in job.devices:
        work.put(None)
    workers = [
        runner(target=worker_main, args=(job, rank, device, run_id, work, events, stop, in_process), daemon=True)
        for rank, device in enumerate(job.devices)
    ]
    with _sigint_ignored():
        for worker in workers:
            worker.start()
    return workers, work, events  # the caller keeps `work` alive: spawned children unpickle it late


class _Interrupts:
    """Ctrl-C during a local run: the first lets each worker finish its batch in flight and stop; a second,
    while workers still run, drops that batch (processes are killed; a thread, which cannot be, is left
    behind). Presses once the workers are done (the merge) change nothing. Records on disk stay."""

    def __init__(self, stop):
        self.stop, self.count, self.previous, self.waiting = stop, 0, None, False

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.stop.set()
            log.warning("stopping after the batch in flight; Ctrl-C again to stop at once")
        elif self.waiting:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _run_local(job: Job, run_id: str, pending: list[Item], progress: Progress, interrupts: _Interrupts) -> None:
    """Run the workers until they finish, or Ctrl-C (through `interrupts`) stops them."""
    workers, work, events = _start_workers(job, run_id, pending, interrupts.stop)
    interrupts.waiting, dropped = True, False
    try:
        _follow(job, workers, events, progress)
    except KeyboardInterrupt:  # the second Ctrl-C: the batches in flight are dropped
        dropped = True
        for worker in workers:
            if not isinstance(worker, threading.Thread):
                worker.kill()
    finally:
        interrupts.waiting = False
    for worker in workers:
        if not (dropped and isinstance(worker, threading.Thread)):
            worker.join(timeout=5)
    del work


def _follow(job: Job, workers: list, events, progress: Progress) -> None:
    """Feed the workers' events to progress until every worker has left."""
    live = len(workers)
    while live:
        try:
            kind, rank, payload, extra = events.get(timeout=1.0)
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                break  # a worker died without a word (killed): stop waiting for it
            continue
        device = job.devices[rank]
        if kind == "loaded":
            progress.loaded(rank, payload, extra)
        elif kind == "fatal":
            log.error("worker %d (%s) could not start: %s", rank, device, extra)
            live -= 1
        elif kind == "stopped":
            log.error("worker %d (%s) stopped: %s", rank, device, extra)
            live -= 1
        elif kind == "exit":
            live -= 1
        elif kind == "records":
            progress.records(rank, device, payload)


def annotate(job: Job, progress: bool = True) -> Summary:
    """Run the job; return what happened. Records are in job.output_dir/annotations.jsonl.

    Called from the main thread, Ctrl-C stops a local run (see _Interrupts), which then merges what was
    done and says so in the summary (`interrupted`).
    """
    started = time.perf_counter()
    pending, skipped = plan(job)
    summary = Summary(total=len(pending) + skipped, skipped=skipped, task=job.task,
                      max_new_tokens=job.decoding.max_new_tokens)  # fmt: skip
    if skipped:
        log.info("%d of %d files were finished by an earlier run", skipped, summary.total)
    with _Interrupts(_stop_event(job)) if job.ray is None else nullcontext() as interrupts:
        if pending:
            tracker = Progress(summary, len(pending), progress, started)
            run_id = uuid.uuid4().hex[:8]
            if job.ray is not None:
                run_on_ray(job, run_id, pending, tracker)
            else:
                _run_local(job, run_id, pending, tracker, interrupts)
                summary.interrupted = interrupts.count > 0
            tracker.close()
            summary.not_processed = len(pending) - tracker.seen
        try:
            merge(job.output_dir)
        except OSError as error:  # the records stay in their part files, which the next run merges
            summary.unmerged = error.strerror or str(error)
    summary.elapsed_s = time.perf_counter() - started
    return summary


class _SharedStop:
    """The stop flag of spawned workers: one shared byte, read at every decode step without a lock (an Event's
    lock, held by a worker the OOM killer ends, would hang every other worker)."""

    def __init__(self, context):
        self.flag = context.RawValue("b", 0)

    def set(self) -> None:
        self.flag.value = 1

    def is_set(self) -> bool:
        return bool(self.flag.value)


def _stop_event(job: Job):
    """What tells the workers to stop: shared with spawned processes when there are several."""
    if len(job.devices) > 1:
        import torch.multiprocessing as mp

        return _SharedStop(mp.get_context("spawn"))
    return threading.Event()
