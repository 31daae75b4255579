"""`acecap annotate`: label whole collections, batched by length, resumable, on one or several devices.

The main process finds the inputs, drops what earlier runs finished, and deals the rest out in chunks
through a queue; each worker (a thread for one device, a process per device for several) loads the
model once, decodes a chunk ahead of the device, sorts it by length into batches and writes a record
per file after every batch. A slow device simply takes fewer chunks.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import devices
from .audio import AudioError, Clip, load_audio
from .batching import batch_limits, batches, caption_splitting
from .devices import dtype_name
from .generate import Decoding
from .inputs import Item, discover, in_shard
from .lyrics import INSTRUMENTAL, parse_transcript
from .model import TASKS
from .records import RecordWriter, done_key, file_identity, load_records, merge
from .writers import atomic_write, check_writable

log = logging.getLogger("acecap")

LONG_AUDIO = ("truncate", "segment", "full")
SILENT_PEAK = 1e-4  # -80 dBFS: nothing a person would hear
LONG_FILE_S = 3600.0  # an hour: processed, but probably not a song
SEGMENT_LIMIT_S = LONG_FILE_S  # --long-audio segment captions at most the first hour (230 MB at 16 kHz)
META_SECONDS = 120.0  # meta analyses the first two minutes: enough for tempo and key, ~45 MB a minute
CHUNK_FILES = 64  # at most this many files a worker takes from the queue at a time
ALL_TASKS = (*TASKS, "meta")  # meta: tempo, key and metre from the signal, no model


@dataclass
class Job:
    """Everything that defines an annotate run; the same fields as the command line."""

    inputs: list[str]
    output_dir: Path
    task: str = "caption"
    model: str | None = None
    hub: str = "auto"
    devices: list[str] = field(default_factory=lambda: ["auto"])
    dtype: str = "auto"
    decoder: str = "auto"
    prompt: str | None = None
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int | None = None
    long_audio: str = "truncate"
    max_duration: float = 300.0
    segment_seconds: float = 60.0
    overwrite: bool = False
    write_txt: bool = False
    allow_partial: bool = False  # caption what a file holds when it is shorter than its header says
    shard: tuple[int, int] | None = None
    ray: str | None = None  # a Ray cluster's address ("auto", "ray://host:10001"), or "" for a local one
    ray_actors: int | None = None  # None: one per accelerator in the cluster (one on a CPU-only cluster)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.task not in ALL_TASKS:
            raise ValueError(f"unknown task {self.task!r}: use {', '.join(ALL_TASKS)}")
        if self.long_audio not in LONG_AUDIO:
            raise ValueError(f"unknown --long-audio {self.long_audio!r}: use {', '.join(LONG_AUDIO)}")
        if self.segment_seconds <= 0 or self.max_duration <= 0:
            raise ValueError("--segment-seconds and --max-duration must be positive")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")

    @property
    def model_name(self) -> str:
        """The model as records name it: an absolute folder, a hub id, or the analysis library (meta)."""
        if self.task == "meta":
            import librosa

            return f"librosa {librosa.__version__}"
        name = self.model or TASKS[self.task].model_id
        return str(Path(name).resolve()) if Path(name).is_dir() else name

    @property
    def prompt_text(self) -> str:
        return "" if self.task == "meta" else self.prompt or TASKS[self.task].prompt


@dataclass
class Summary:
    total: int
    skipped: int  # finished by an earlier run
    captioned: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    not_processed: int = 0  # left when every worker had died, or the run was interrupted
    interrupted: bool = False  # Ctrl-C: the run stopped early
    audio_seconds: float = 0.0
    elapsed_s: float = 0.0
    per_device: dict[int, dict] = field(default_factory=dict)  # worker rank → device, files, audio_s

    @property
    def ok(self) -> bool:
        return not self.failures and not self.not_processed


# ---- the worker: one loaded model on one device ---------------------------------------------------


@dataclass
class Decoded:
    item: Item
    identity: dict
    clip: Clip | None
    error: str | None
    audio_s: float


def identity_of(item: Item) -> dict:
    """The file's identity for its record; a file that cannot be stat'ed keeps its path only."""
    try:
        return file_identity(item.path)
    except (OSError, ValueError):  # ValueError: a NUL in a name from a manifest
        return {"path": os.path.abspath(item.path), "size": None, "mtime_ns": None}


def decode_item(item: Item, max_seconds: float | None = None, allow_partial: bool = False) -> Decoded:
    """The file's first `max_seconds` as a clip, or why it cannot be used."""
    start = time.perf_counter()
    identity = identity_of(item)
    if item.error:
        return Decoded(item, identity, None, item.error, 0.0)
    try:
        clip = load_audio(item.path, max_seconds, allow_partial)
    except AudioError as error:
        return Decoded(item, identity, None, str(error), time.perf_counter() - start)
    except Exception as error:  # a decoder bug on one file must not end the run
        return Decoded(item, identity, None, f"cannot decode: {type(error).__name__}: {error}", 0.0)
    return Decoded(item, identity, clip, None, time.perf_counter() - start)


def _prefetch(work, decode: Callable[[Item], Decoded], threads: int = 2) -> Iterator[list[Decoded]]:
    """Decode the next chunk in background threads while the device works on this one."""
    ready: queue.Queue = queue.Queue(maxsize=1)

    def fill() -> None:
        with ThreadPoolExecutor(threads, thread_name_prefix="acecap-decode") as pool:
            for chunk in iter(work.get, None):
                ready.put(list(pool.map(decode, chunk)))
        ready.put(None)

    threading.Thread(target=fill, daemon=True, name="acecap-prefetch").start()
    yield from iter(ready.get, None)


class Worker:
    """Turns chunks of decoded files into records: with a model (caption, lyrics) or without (meta)."""

    def __init__(self, job: Job, captioner, save: Callable[[list[dict], dict[str, Path]], None], stop=None):
        """`save(records, relative)` makes records durable; `relative` maps their paths to output names.
        `stop` (an Event), once set, ends the chunk in flight after its current batch."""
        self.job = job
        self.captioner = captioner
        self.save_records = save
        self.stop = stop
        self.max_duration = job.max_duration
        self.read_seconds = META_SECONDS  # how much of each file is decoded: what will be used
        if captioner is not None:
            full = captioner.max_duration_limit(job.decoding)
            self.max_duration = full if job.long_audio == "full" else min(job.max_duration, full)
            self.read_seconds = SEGMENT_LIMIT_S if job.long_audio == "segment" else self.max_duration
            self.limits = batch_limits(captioner, job.decoding, job.batch_size)
        self.decode = functools.partial(decode_item, max_seconds=self.read_seconds, allow_partial=job.allow_partial)

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def record(self, decoded: Decoded, **fields) -> dict:
        """The file's record; it never raises: whatever goes wrong describing the file becomes its error."""
        clip = decoded.clip
        record = {
            **decoded.identity,
            "task": self.job.task,
            "model": self.job.model_name,
            "revision": self.captioner.revision if self.captioner else None,
            "prompt": self.job.prompt_text,
            "duration": None,
            self.job.task: None,
            "tokens": None,
            "truncated": False,
            "silent": False,
            "long": False,
            "partial": None,
            "device": str(self.captioner.device) if self.captioner else "cpu",
            "dtype": dtype_name(self.captioner.dtype) if self.captioner else None,
            "timings": {"audio_s": decoded.audio_s},
            "error": decoded.error,
        }
        if clip is not None:
            try:
                record.update(
                    duration=clip.duration,
                    truncated=bool(self.captioner and clip.duration > self.read_seconds),
                    silent=bool(float(np.abs(clip.samples).max()) < SILENT_PEAK),
                    long=clip.duration > LONG_FILE_S,
                    partial=clip.partial,
                )
            except Exception as error:  # one odd file must not end the run
                record["error"] = f"cannot describe the audio: {type(error).__name__}: {error}"
        record.update(fields)
        return record

    def save(self, records: list[dict], good: list[Decoded]) -> None:
        self.save_records(records, {d.identity["path"]: d.item.relative for d in good})

    def run_chunk(self, chunk: list[Decoded]) -> None:
        self.save([self.record(d) for d in chunk if d.clip is None], [])
        good = [d for d in chunk if d.clip is not None]
        if self.job.task == "meta":
            self._meta(good)
        elif self.job.long_audio == "segment":
            self._segments(good)
        else:
            self._whole(good)

    def _whole(self, good: list[Decoded]) -> None:
        by_clip = {id(d.clip): d for d in good}
        for batch in batches([d.clip for d in good], self.max_duration, self.limits):
            if self.stopped():
                return
            results = caption_splitting(self.captioner, batch, self.job.decoding, self.max_duration)
            batch_records = []
            for clip, result in zip(batch, results, strict=True):
                decoded = by_clip[id(clip)]
                if isinstance(result, str):
                    batch_records.append(self.record(decoded, error=result))
                    continue
                timings = {**asdict(result.timings), "audio_s": decoded.audio_s}
                batch_records.append(
                    self.record(
                        decoded,
                        **self._text_fields([result.text]),
                        tokens=result.tokens,
                        finished=result.finished,
                        captioned_seconds=result.captioned_seconds,
                        timings=timings,
                    )
                )
            self.save(batch_records, good)

    def _segments(self, good: list[Decoded]) -> None:
        step = int(self.job.segment_seconds * 16000)
        windows = []  # (decoded, start_s, clip)
        for decoded in good:
            samples = decoded.clip.samples
            for start in range(0, len(samples), step):
                window = Clip(samples[start : start + step], decoded.clip.source)
                windows.append((decoded, start / 16000, window))
        by_clip = {id(w[2]): w for w in windows}
        texts: dict[int, list[dict]] = {id(d): [] for d in good}
        errors: dict[int, str] = {}
        for batch in batches([w[2] for w in windows], self.max_duration, self.limits):
            if self.stopped():
                return
            results = caption_splitting(self.captioner, batch, self.job.decoding, self.max_duration)
            for clip, result in zip(batch, results, strict=True):
                decoded, start, _ = by_clip[id(clip)]
                if isinstance(result, str):
                    errors[id(decoded)] = result
                    continue
                texts[id(decoded)].append(
                    {"start": start, "end": start + clip.duration, "text": result.text, "tokens": result.tokens}
                )
        records = []
        for decoded in good:
            if id(decoded) in errors:
                records.append(self.record(decoded, error=errors[id(decoded)]))
                continue
            segments = sorted(texts[id(decoded)], key=lambda s: s["start"])
            tokens = sum(s["tokens"] for s in segments)
            fields = self._text_fields([s["text"] for s in segments])
            records.append(self.record(decoded, **fields, tokens=tokens, segments=segments))
        self.save(records, good)

    def _text_fields(self, texts: list[str]) -> dict:
        """The record's fields for the model's text (one per segment): a caption as it is; lyrics parsed
        into language, tagged lines and is_instrumental, the raw text kept."""
        if self.job.task != "lyrics":
            return {self.job.task: "\n".join(texts)}
        parsed = [parse_transcript(text) for text in texts]
        sung = [p for p in parsed if not p.is_instrumental]
        languages = [p.language for p in parsed if p.language != "unknown"]
        return {
            "lyrics": "\n\n".join(p.lyrics for p in sung) if sung else INSTRUMENTAL,
            "language": languages[0] if languages else "unknown",
            "is_instrumental": not sung,
            "raw_lyrics": "\n\n".join(texts),
        }

    def _meta(self, good: list[Decoded]) -> None:
        """Tempo, key and metre of each file, from the signal; a failure is that file's error record."""
        from .meta import analyse

        records = []
        for decoded in good:
            if self.stopped():
                break
            start = time.perf_counter()
            try:
                meta = analyse(decoded.clip.samples)
            except Exception as error:  # one file's analysis failing must not end the run
                records.append(self.record(decoded, error=f"analysis failed: {type(error).__name__}: {error}"))
                continue
            fields = {key: value for key, value in meta.to_dict().items() if key != "duration"}
            timings = {"audio_s": decoded.audio_s, "total_s": time.perf_counter() - start}
            records.append(self.record(decoded, meta=meta.summary(), **fields, timings=timings))
        self.save(records, good)


def sidecar_path(job: Job, relative: Path) -> Path:
    """With -f txt: OUT/<relative path>.<task>.txt."""
    return job.output_dir / relative.with_suffix(f".{job.task}.txt")


def _with_sidecar(job: Job, record: dict, relative: dict[str, Path]) -> dict:
    """The record after writing its sidecar; an error record if the sidecar cannot be written."""
    if record["error"] is not None or record["path"] not in relative:
        return record
    try:
        atomic_write(sidecar_path(job, relative[record["path"]]), record[job.task] + "\n")
    except OSError as error:
        return {**record, "error": f"cannot write its .{job.task}.txt: {error.strerror or error}"}
    return record


def commit(job: Job, writer: RecordWriter, records: list[dict], relative: dict[str, Path]) -> list[dict]:
    """Sidecars first, then the records that say their files are done: a kill between the two leaves a
    sidecar without a record (redone next run), never a record without its sidecar. The records written."""
    if job.write_txt:
        records = [_with_sidecar(job, record, relative) for record in records]
    writer.write(records)
    return records


def load_captioner(job: Job, device: str):
    """The job's model on `device`, or None for meta, which needs none."""
    from .captioner import Captioner

    if job.task == "meta":
        return None
    return Captioner.from_pretrained(
        job.model, task=job.task, device=device, dtype=job.dtype, hub=job.hub, prompt=job.prompt, decoder=job.decoder
    )


def summarise_records(records: list[dict]) -> list[tuple[str, float, str | None]]:
    """(path, duration, error) per record: what progress and the summary count."""
    return [(r["path"], r["duration"] or 0.0, r["error"]) for r in records]


def _die_with_parent() -> None:
    """A worker process must stop when the main process dies, even by kill -9, and write no more records:
    Linux kills it then (parent-death signal); elsewhere a thread watches for the parent to go."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:

        def watch() -> None:
            while parent.is_alive():
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="acecap-parent-watch").start()
    if parent is not None and not parent.is_alive():  # it died before the signal was set up
        os._exit(1)


def _worker_main(job: Job, rank: int, device: str, run_id: str, work, events, stop, in_process: bool) -> None:
    """Body of each worker, thread or process: load once, then take chunks until the queue says stop."""
    if in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        _die_with_parent()
    try:
        captioner = load_captioner(job, device)
    except Exception as error:
        events.put(("fatal", rank, device, f"{type(error).__name__}: {error}"))
        return
    writer = RecordWriter(job.output_dir, f"{run_id}-{rank}")

    def save(records: list[dict], relative: dict[str, Path]) -> None:
        records = commit(job, writer, records, relative)
        events.put(("records", rank, summarise_records(records), None))

    worker = Worker(job, captioner, save, stop)
    loaded = (str(captioner.device), captioner.load_s) if captioner else ("cpu", 0.0)
    events.put(("loaded", rank, *loaded))
    for chunk in _prefetch(work, worker.decode):
        if stop.is_set():
            break
        worker.run_chunk(chunk)
    events.put(("exit", rank, device, None))


# ---- the main process: inputs, resume, workers, progress ------------------------------------------


def _restore_sidecar(job: Job, record: dict, relative: Path) -> None:
    """A finished file whose .txt is missing (deleted, or lost by an older version) gets it back from its record."""
    path = sidecar_path(job, relative)
    try:
        if not path.exists():
            atomic_write(path, record[job.task] + "\n")
    except OSError as error:
        log.warning("%s: cannot write it again: %s", path, error.strerror or error)


def plan(job: Job) -> tuple[list[Item], int]:
    """The inputs still to do, and how many an earlier run already finished."""
    items = [item for item in discover(job.inputs) if in_shard(item, job.shard)]
    records = [] if job.overwrite else load_records(job.output_dir)
    done = {done_key(record): record for record in records if not record.get("error")}
    pending = []
    for item in items:
        try:
            identity = file_identity(item.path)
        except (OSError, ValueError):
            pending.append(item)  # reading it will record why it cannot be read
            continue
        record = done.get(done_key({**identity, "model": job.model_name, "task": job.task, "prompt": job.prompt_text}))
        if record is None or item.error:
            pending.append(item)
        elif job.write_txt:
            _restore_sidecar(job, record, item.relative)
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
        runner(target=_worker_main, args=(job, rank, device, run_id, work, events, stop, in_process), daemon=True)
        for rank, device in enumerate(job.devices)
    ]
    with _sigint_ignored():
        for worker in workers:
            worker.start()
    return workers, work, events  # the caller keeps `work` alive: spawned children unpickle it late


class Progress:
    """The progress bar and the summary's counts, fed by whichever workers run the job."""

    def __init__(self, summary: Summary, pending: int, show: bool, started: float):
        from tqdm.auto import tqdm

        self.summary, self.started, self.seen = summary, started, 0
        self.bar = tqdm(total=pending, unit="file", disable=not show, dynamic_ncols=True, smoothing=0.1)

    def stats(self, rank: int, device: str) -> dict:
        return self.summary.per_device.setdefault(rank, {"device": device, "files": 0, "audio_s": 0.0})

    def loaded(self, rank: int, device: str, load_s: float) -> None:
        stats = self.stats(rank, device)
        stats["device"], stats["load_s"] = device, load_s
        log.info("worker %d: model on %s in %.1f s", rank, device, load_s)

    def records(self, rank: int, device: str, entries: list[tuple[str, float, str | None]]) -> None:
        summary, stats = self.summary, self.stats(rank, device)
        for path, duration, error in entries:
            self.seen += 1
            stats["files"] += 1
            stats["audio_s"] += duration
            summary.audio_seconds += duration
            if error:
                summary.failures.append((path, error))
            else:
                summary.captioned += 1
        elapsed = time.perf_counter() - self.started
        left = self.bar.total - self.seen
        eta = f", ETA {left / self.seen * elapsed / 60:.0f} min" if self.seen and left else ""
        self.bar.update(len(entries))
        self.bar.set_postfix_str(
            f"{summary.audio_seconds / 3600:.2f} h audio, {self.seen / elapsed * 60:.1f} files/min, "
            f"{summary.audio_seconds / elapsed:.1f} audio-s/s, {len(summary.failures)} failed{eta}"
        )

    def close(self) -> None:
        self.bar.close()


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
    check_writable(job.output_dir)
    pending, skipped = plan(job)
    summary = Summary(total=len(pending) + skipped, skipped=skipped)
    if skipped:
        log.info("%d of %d files were finished by an earlier run", skipped, summary.total)
    with _Interrupts(_stop_event(job)) if job.ray is None else nullcontext() as interrupts:
        if pending:
            tracker = Progress(summary, len(pending), progress, started)
            run_id = uuid.uuid4().hex[:8]
            if job.ray is not None:
                from .cluster import run_on_ray

                run_on_ray(job, run_id, pending, tracker)
            else:
                _run_local(job, run_id, pending, tracker, interrupts)
                summary.interrupted = interrupts.count > 0
            tracker.close()
            summary.not_processed = len(pending) - tracker.seen
        merge(job.output_dir)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _stop_event(job: Job):
    """What tells the workers to stop: shared with spawned processes when there are several."""
    if len(job.devices) > 1:
        import torch.multiprocessing as mp

        return mp.get_context("spawn").Event()
    return threading.Event()


def summary_table(summary: Summary) -> str:
    """The closing report: counts, rates, per device, and every failure with its reason."""
    minutes = summary.elapsed_s / 60
    lines = [
        f"files          {summary.total} ({summary.skipped} done earlier)",
        f"captioned      {summary.captioned}",
        f"failed         {len(summary.failures)}",
        f"audio          {summary.audio_seconds / 3600:.2f} h in {summary.elapsed_s:.1f} s",
    ]
    if summary.elapsed_s > 0 and summary.captioned + len(summary.failures):
        done = summary.captioned + len(summary.failures)
        lines.append(
            f"rate           {done / minutes:.1f} files/min, {summary.audio_seconds / summary.elapsed_s:.1f} audio-s/s"
        )
    for rank, stats in summary.per_device.items():
        rate = stats["audio_s"] / summary.elapsed_s if summary.elapsed_s else 0.0
        lines.append(f"  worker {rank} on {stats['device']}: {stats['files']} files, {rate:.1f} audio-s/s")
    if summary.not_processed:
        why = "interrupted" if summary.interrupted else "no worker left"
        lines.append(f"not processed  {summary.not_processed} ({why}; run the command again)")
    for path, error in summary.failures:
        lines.append(f"  FAILED {path}: {error}")
    return "\n".join(lines)
