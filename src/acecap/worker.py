"""One annotate worker: a loaded model (or none, for meta) on one device turning a stream of files into
records. Files are decoded ahead of the device by the input pipeline's processes (pipeline.py), each only as
far as it will be used; clips are captioned by continuous batching (engine.py), and each file's record is saved
as soon as it is made; it never raises. -f txt sidecars are committed before the records that say their files
are done. The same Worker runs in a thread, in a spawned process per device, or in a Ray actor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .audio import MIN_SAMPLES, Clip
from .batching import batch_limits, default_batch_size
from .devices import dtype_name
from .inputs import Item
from .job import Job
from .lyrics import INSTRUMENTAL, parse_transcript
from .pipeline import Decoded, Pipeline, default_workers
from .progress import output_flags
from .records import RecordWriter
from .repetition import is_repetitive
from .writers import atomic_write

log = logging.getLogger("acecap")

SILENT_PEAK = 1e-4  # -80 dBFS: nothing a person would hear
LONG_FILE_S = 3600.0  # an hour: processed, but probably not a song
SEGMENT_LIMIT_S = LONG_FILE_S  # --long-audio segment captions at most the first hour (230 MB at 16 kHz)
META_SECONDS = 120.0  # meta analyses the first two minutes: enough for tempo and key, ~45 MB a minute


def read_seconds(job: Job, captioner) -> float | None:
    """How much of each file is decoded: what will be used. None: that depends on a model not loaded yet."""
    if job.task == "meta":
        return META_SECONDS
    if job.long_audio == "segment":
        return SEGMENT_LIMIT_S
    if captioner is None:
        return None
    full = captioner.max_duration_limit(job.decoding)
    return full if job.long_audio == "full" else min(job.max_duration, full)


def decode_options(job: Job, seconds: float | None) -> dict:
    """What the pipeline's `decode_item` gets for every file of the job."""
    return {"max_seconds": seconds, "allow_partial": job.allow_partial}


class Worker:
    """Turns a stream of decoded files into records: with a model (caption, lyrics) or without (meta)."""

    def __init__(self, job: Job, captioner, save: Callable[[list[dict], dict[str, Path]], None], stop=None):
        """`save(records, relative)` makes records durable; `relative` maps their paths to output names.
        `stop` (an Event), once set, lets the clips on the device finish and starts no more."""
        self.job = job
        self.captioner = captioner
        self.save_records = save
        self.saving = threading.Lock()  # error records are saved from the thread that reads the stream
        self.stop = stop
        self.max_duration = job.max_duration
        self.read_seconds = read_seconds(job, captioner)
        if captioner is not None:
            full = captioner.max_duration_limit(job.decoding)
            # --max-duration is truncate's: a segment window is captioned whole (load_captioner checked it fits)
            self.max_duration = min(job.max_duration, full) if job.long_audio == "truncate" else full
            self.limits = batch_limits(captioner, job.decoding, job.batch_size)
        self.decode_options = decode_options(job, self.read_seconds)

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
            "long_audio": None if self.job.task == "meta" else self.job.long_audio,
            "max_duration": None if self.job.task == "meta" else self.job.max_duration,
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
        with self.saving:
            self.save_records(records, {d.identity["path"]: d.item.relative for d in good})

    def run(self, decoded: Iterable[Decoded]) -> None:
        """Records for a stream of decoded files, each saved as soon as it is made."""
        if self.job.task == "meta":
            for one in self._clips(decoded):
                self._meta(one)
        elif self.job.long_audio == "segment":
            self._segments(decoded)
        else:
            self._whole(decoded)

    def _clips(self, decoded: Iterable[Decoded]) -> Iterator[Decoded]:
        """The decoded files that have a clip, until stopped; the others get their error record here."""
        for one in decoded:
            if self.stopped():
                return
            if one.clip is None:
                self.save([self.record(one)], [])
            else:
                yield one

    def _caption(self, items: Iterable[tuple]) -> Iterator[tuple]:
        """The captioner's stream over (key, clip) items, within the worker's batch limits."""
        return self.captioner.caption_stream(
            items,
            self.job.decoding,
            max_duration=self.max_duration,
            rows=self.limits.clips,
            cache_bytes=self.limits.cache_bytes,
            stop=self.stopped,
        )

    def _whole(self, decoded: Iterable[Decoded]) -> None:
        for one, result in self._caption((one, one.clip) for one in self._clips(decoded)):
            if isinstance(result, str):
                self.save([self.record(one, error=result)], [one])
                continue
            timings = {**asdict(result.timings), "audio_s": one.audio_s}
            record = self.record(
                one,
                **self._text_fields([result.text]),
                tokens=result.tokens,
                finished=result.finished,
                captioned_seconds=result.captioned_seconds,
                timings=timings,
            )
            self.save([record], [one])

    def _segments(self, decoded: Iterable[Decoded]) -> None:
        """Consecutive windows of each file captioned in the stream; a file's record once all its windows are."""
        step = int(self.job.segment_seconds * 16000)
        files: dict[int, dict] = {}  # id(decoded) -> its windows left, segments and first error

        def windows() -> Iterator[tuple]:
            for one in self._clips(decoded):
                samples = one.clip.samples
                starts = list(range(0, len(samples), step))
                if len(starts) > 1 and len(samples) - starts[-1] < MIN_SAMPLES:  # a tail too short to hear
                    starts.pop()  # joins the window before it
                ends = [*starts[1:], len(samples)]
                files[id(one)] = {"left": len(starts), "segments": [], "error": None}
                for start, end in zip(starts, ends, strict=True):
                    window = Clip(samples[start:end], one.clip.source)
                    yield (one, start / 16000, window.duration), window

        for (one, start, seconds), result in self._caption(windows()):
            state = files[id(one)]
            state["left"] -= 1
            if isinstance(result, str):
                state["error"] = state["error"] or result
            else:
                state["segments"].append({"start": start, "end": start + seconds, "text": result.text,
                                          "tokens": result.tokens, "finished": result.finished})  # fmt: skip
            if state["left"]:
                continue
            del files[id(one)]
            if state["error"]:
                self.save([self.record(one, error=state["error"])], [one])
                continue
            segments = sorted(state["segments"], key=lambda s: s["start"])
            tokens = sum(s["tokens"] for s in segments)
            fields = self._text_fields([s["text"] for s in segments])
            finished = all(s["finished"] for s in segments)
            self.save([self.record(one, **fields, tokens=tokens, finished=finished, segments=segments)], [one])

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

    def _meta(self, decoded: Decoded) -> None:
        """Tempo, key and metre of the file, from the signal; a failure is its error record."""
        from .meta import describe

        start = time.perf_counter()
        try:
            meta = describe(decoded.item.path, decoded.clip.samples, self.job.meta_sources)
        except Exception as error:  # one file's analysis failing must not end the run
            self.save([self.record(decoded, error=f"analysis failed: {type(error).__name__}: {error}")], [decoded])
            return
        fields = {key: value for key, value in meta.to_dict().items() if key != "duration"}
        timings = {"audio_s": decoded.audio_s, "total_s": time.perf_counter() - start}
        self.save([self.record(decoded, meta=meta.summary(), **fields, timings=timings)], [decoded])


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
    """The job's model on `device`, or None for meta, which needs none; ValueError when --long-audio segment's
    windows are longer than the model takes in one pass."""
    from .captioner import Captioner

    if job.task == "meta":
        return None
    captioner = Captioner.from_pretrained(job.model, task=job.task, device=device, dtype=job.dtype, hub=job.hub,
                                          prompt=job.prompt, decoder=job.decoder, quant=job.quant,
                                          prefill_tokens=job.prefill_tokens)  # fmt: skip
    longest = captioner.max_duration_limit(job.decoding)
    if job.long_audio == "segment" and job.segment_seconds > longest:  # each window would lose its end
        raise ValueError(f"--segment-seconds {job.segment_seconds:g}: this model takes at most {longest:.0f} s "
                         f"in one pass with --max-new-tokens {job.decoding.max_new_tokens}: give a shorter "
                         "window")  # fmt: skip
    return captioner


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


def decode_workers(job: Job) -> int:
    """Decoding processes for each device's worker: --decode-workers, or the host's cores shared out."""
    return job.decode_workers or default_workers(len(job.devices))


def _items(work, stop) -> Iterator[Item]:
    """The files of the queue's chunks, until the queue says stop or the run is stopped."""
    for chunk in iter(work.get, None):
        if stop.is_set():
            return
        yield from chunk


def worker_main(job: Job, rank: int, device: str, run_id: str, work, events, stop, in_process: bool) -> None:
    """Body of each worker, thread or process: load once, then caption the files of the queue's chunks as they
    are decoded, until the queue says stop."""
    if in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        _die_with_parent()
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # several processes' "Loading weights" bars would interleave
        transformers_logging.set_verbosity_error()  # as the command line sets it in the main process
    items = _items(work, stop)
    ahead = job.batch_size or default_batch_size(device.partition(":")[0])
    with contextlib.ExitStack() as pipelines:
        decoded = None
        early = read_seconds(job, None)
        # One device: decoding starts while the model loads, where how much of each file to decode does not
        # depend on the model. With several, a device whose model fails to load must not hold others' files.
        if len(job.devices) == 1 and early is not None:
            pipeline = pipelines.enter_context(Pipeline(decode_workers(job), decode_options(job, early)))
            decoded = pipeline.decode(items, ahead)
        try:
            captioner = load_captioner(job, device)
        except Exception as error:
            events.put(("fatal", rank, device, f"{type(error).__name__}: {error}"))
            return
        try:
            writer = pipelines.enter_context(RecordWriter(job.output_dir, f"{run_id}-{rank}"))
        except OSError as error:
            events.put(("fatal", rank, device, f"cannot write the records: {error.strerror or error}"))
            return

        def save(records: list[dict], relative: dict[str, Path]) -> None:
            records = commit(job, writer, records, relative)
            events.put(("records", rank, summarise_records(records), None))

        worker = Worker(job, captioner, save, stop)
        loaded = (str(captioner.device), captioner.load_s) if captioner else ("cpu", 0.0)
        events.put(("loaded", rank, *loaded))
        if decoded is None:
            pipeline = pipelines.enter_context(Pipeline(decode_workers(job), worker.decode_options))
            decoded = pipeline.decode(items, ahead)
        try:
            worker.run(decoded)
        except OSError as error:  # the records cannot be written (a full disk): stop, saying why
            events.put(("stopped", rank, device, f"cannot write the records: {error.strerror or error}"))
            return
    events.put(("exit", rank, device, None))
