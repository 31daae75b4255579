"""One annotate worker: a loaded model (or none, for meta) on one device turning chunks of files into
records. Each file is decoded only as far as it will be used; its record never raises; -f txt sidecars are
committed before the records that say their files are done. The same Worker runs in a thread, in a spawned
process per device, or in a Ray actor.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .audio import AudioError, Clip, load_audio
from .batching import batch_limits, batches, caption_splitting
from .devices import dtype_name
from .inputs import Item
from .job import Job
from .lyrics import INSTRUMENTAL, parse_transcript
from .progress import output_flags
from .records import RecordWriter, file_identity
from .repetition import is_repetitive
from .writers import atomic_write

log = logging.getLogger("acecap")

SILENT_PEAK = 1e-4  # -80 dBFS: nothing a person would hear
LONG_FILE_S = 3600.0  # an hour: processed, but probably not a song
SEGMENT_LIMIT_S = LONG_FILE_S  # --long-audio segment captions at most the first hour (230 MB at 16 kHz)
META_SECONDS = 120.0  # meta analyses the first two minutes: enough for tempo and key, ~45 MB a minute


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
            "repetitive": False,
            "partial": None,
            "device": str(self.captioner.device) if self.captioner else "cpu",
            "dtype": dtype_name(self.captioner.dtype) if self.captioner else None,
            "quant": self.captioner.quant if self.captioner else None,
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
                texts[id(decoded)].append({"start": start, "end": start + clip.duration, "text": result.text,
                                           "tokens": result.tokens, "finished": result.finished})  # fmt: skip
        records = []
        for decoded in good:
            if id(decoded) in errors:
                records.append(self.record(decoded, error=errors[id(decoded)]))
                continue
            segments = sorted(texts[id(decoded)], key=lambda s: s["start"])
            tokens = sum(s["tokens"] for s in segments)
            fields = self._text_fields([s["text"] for s in segments])
            finished = all(s["finished"] for s in segments)
            records.append(self.record(decoded, **fields, tokens=tokens, finished=finished, segments=segments))
        self.save(records, good)

    def _text_fields(self, texts: list[str]) -> dict:
        """The record's fields for the model's text (one per segment): a caption as it is (of segments, the
        first: ACE-Step takes one description of a song, and every window's stays in `segments`); lyrics, which
        follow on from window to window, parsed into language, tagged lines and is_instrumental, the raw text
        kept. `repetitive`: some text ends in a loop."""
        repetitive = any(is_repetitive(text, self.job.task) for text in texts)
        if self.job.task != "lyrics":
            return {self.job.task: texts[0] if texts else "", "repetitive": repetitive}
        parsed = [parse_transcript(text) for text in texts]
        sung = [p for p in parsed if not p.is_instrumental]
        languages = [p.language for p in parsed if p.language != "unknown"]
        return {
            "lyrics": "\n\n".join(p.lyrics for p in sung) if sung else INSTRUMENTAL,
            "language": languages[0] if languages else "unknown",
            "is_instrumental": not sung,
            "raw_lyrics": "\n\n".join(texts),
            "repetitive": repetitive,
        }

    def _meta(self, good: list[Decoded]) -> None:
        """Tempo, key and metre of each file, from the signal; a failure is that file's error record."""
        from .meta import describe

        records = []
        for decoded in good:
            if self.stopped():
                break
            start = time.perf_counter()
            try:
                meta = describe(decoded.item.path, decoded.clip.samples, self.job.meta_sources)
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
    return Captioner.from_pretrained(job.model, task=job.task, device=device, dtype=job.dtype, hub=job.hub,
                                     prompt=job.prompt, decoder=job.decoder, quant=job.quant)  # fmt: skip


def summarise_records(records: list[dict]) -> list[tuple[str, float, str | None, tuple[str, ...]]]:
    """(path, duration, error, flags) per record: what progress and the summary count (FLAGS, progress.py)."""
    return [(r["path"], r["duration"] or 0.0, r["error"], output_flags(r)) for r in records]


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


def worker_main(job: Job, rank: int, device: str, run_id: str, work, events, stop, in_process: bool) -> None:
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
