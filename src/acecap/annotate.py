"""`acecap annotate`: label whole collections, batched by length, resumable, on one or several devices.

The main process finds the inputs, drops what earlier runs finished, and deals the rest out in chunks
through a queue; each worker (a thread for one device, a process per device for several) loads the
model once, decodes a chunk ahead of the device, sorts it by length into batches and writes a record
per file after every batch. A slow device simply takes fewer chunks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import devices
from .audio import Clip
from .batching import batch_limits, default_batch_size
from .decode import PREFILL_TOKENS
from .devices import dtype_name
from .generate import Decoding
from .inputs import Item, discover, in_shard
from .lyrics import INSTRUMENTAL, parse_transcript
from .model import TASKS
from .pipeline import Decoded, Pipeline, default_workers
from .records import RecordWriter, completed, done_key, file_identity, load_records, merge
from .writers import atomic_write

log = logging.getLogger("acecap")

LONG_AUDIO = ("truncate", "segment", "full")
SILENT_PEAK = 1e-4  # -80 dBFS: nothing a person would hear
LONG_FILE_S = 3600.0  # an hour: processed, but probably not a song
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
    shard: tuple[int, int] | None = None
    ray: str | None = None  # a Ray cluster's address ("auto", "ray://host:10001"), or "" for a local one
    ray_actors: int | None = None  # None: one per accelerator in the cluster (one on a CPU-only cluster)
    decode_workers: int | None = None  # audio decoding processes per device; None: the host's cores shared out
    prefill_tokens: int = PREFILL_TOKENS  # prompt tokens per prefill pass

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
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ValueError("--decode-workers must be at least 1")
        if self.prefill_tokens < 1:
            raise ValueError("--prefill-tokens must be at least 1")

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
    not_processed: int = 0  # left when every worker had died
    audio_seconds: float = 0.0
    elapsed_s: float = 0.0
    per_device: dict[int, dict] = field(default_factory=dict)  # worker rank → device, files, audio_s

    @property
    def ok(self) -> bool:
        return not self.failures and not self.not_processed


# ---- the worker: one loaded model on one device ---------------------------------------------------


def load_options(job: Job) -> dict:
    """The keyword arguments every `load_audio` call of the job gets (none yet: the whole file, decoded)."""
    return {}


def decode_workers(job: Job) -> int:
    """Decoding processes for each device's worker: --decode-workers, or the host's cores shared out."""
    return job.decode_workers or default_workers(len(job.devices))


class Worker:
    """Turns a stream of decoded files into records: with a model (caption, lyrics) or without (meta)."""

    def __init__(self, job: Job, captioner, save: Callable[[list[dict], dict[str, Path]], None]):
        """`save(records, relative)` makes records durable; `relative` maps their paths to output names."""
        self.job = job
        self.captioner = captioner
        self.save_records = save
        self.saving = threading.Lock()
        self.max_duration = job.max_duration
        if captioner is not None:
            full = captioner.max_duration_limit(job.decoding)
            self.max_duration = full if job.long_audio == "full" else min(job.max_duration, full)
            self.limits = batch_limits(captioner, job.decoding, job.batch_size)

    def record(self, decoded: Decoded, **fields) -> dict:
        clip = decoded.clip
        record = {
            **decoded.identity,
            "task": self.job.task,
            "model": self.job.model_name,
            "revision": self.captioner.revision if self.captioner else None,
            "prompt": self.job.prompt_text,
            "duration": clip.duration if clip else None,
            self.job.task: None,
            "tokens": None,
            "truncated": bool(
                clip and self.captioner and self.job.long_audio != "segment" and clip.duration > self.max_duration
            ),
            "silent": bool(clip and float(np.abs(clip.samples).max()) < SILENT_PEAK),
            "long": bool(clip and clip.duration > LONG_FILE_S),
            "device": str(self.captioner.device) if self.captioner else "cpu",
            "dtype": dtype_name(self.captioner.dtype) if self.captioner else None,
            "timings": {"audio_s": decoded.audio_s},
            "error": decoded.error,
        }
        record.update(fields)
        return record

    def save(self, records: list[dict], good: list[Decoded]) -> None:
        with self.saving:  # error records are made on the thread that reads the stream
            self.save_records(records, {d.identity["path"]: d.item.relative for d in good})

    def run(self, decoded: Iterable[Decoded]) -> None:
        """Records for a stream of decoded files, each saved as soon as it is made."""
        if self.job.task == "meta":
            for one in self._clips(decoded):
                self._meta([one])
        elif self.job.long_audio == "segment":
            self._segments(decoded)
        else:
            self._whole(decoded)

    def _clips(self, decoded: Iterable[Decoded]):
        """The decoded files that have a clip; the others get their error record here."""
        for one in decoded:
            if one.clip is None:
                self.save([self.record(one)], [])
            else:
                yield one

    def _caption(self, items):
        """The captioner's stream over (key, clip) items, within the worker's batch limits."""
        return self.captioner.caption_stream(
            items,
            self.job.decoding,
            max_duration=self.max_duration,
            rows=self.limits.clips,
            cache_bytes=self.limits.cache_bytes,
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
        files: dict[int, dict] = {}  # id(decoded) → its windows left, segments and first error

        def windows():
            for one in self._clips(decoded):
                samples = one.clip.samples
                files[id(one)] = {"left": -(-len(samples) // step), "segments": [], "error": None}
                for start in range(0, len(samples), step):
                    yield (one, start / 16000), Clip(samples[start : start + step], one.clip.source)

        for (one, start), result in self._caption(windows()):
            state = files[id(one)]
            state["left"] -= 1
            if isinstance(result, str):
                state["error"] = state["error"] or result
            else:
                end = start + result.captioned_seconds
                state["segments"].append({"start": start, "end": end, "text": result.text, "tokens": result.tokens})
            if state["left"]:
                continue
            del files[id(one)]
            if state["error"]:
                self.save([self.record(one, error=state["error"])], [one])
                continue
            segments = sorted(state["segments"], key=lambda s: s["start"])
            tokens = sum(s["tokens"] for s in segments)
            fields = self._text_fields([s["text"] for s in segments])
            self.save([self.record(one, **fields, tokens=tokens, segments=segments)], [one])

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


def write_txt(job: Job, records: list[dict], relative: dict[str, Path]) -> None:
    """With -f txt: OUT/<relative path>.<task>.txt for each record that has a text."""
    if not job.write_txt:
        return
    for record in records:
        if record["error"] is None and record["path"] in relative:
            name = relative[record["path"]].with_suffix(f".{job.task}.txt")
            atomic_write(job.output_dir / name, record[job.task] + "\n")


def load_captioner(job: Job, device: str):
    """The job's model on `device`, or None for meta, which needs none."""
    from .captioner import Captioner

    if job.task == "meta":
        return None
    options = {"dtype": job.dtype, "hub": job.hub, "prompt": job.prompt, "decoder": job.decoder}
    return Captioner.from_pretrained(
        job.model, task=job.task, device=device, prefill_tokens=job.prefill_tokens, **options
    )


def summarise_records(records: list[dict]) -> list[tuple[str, float, str | None]]:
    """(path, duration, error) per record: what progress and the summary count."""
    return [(r["path"], r["duration"] or 0.0, r["error"]) for r in records]


def _worker_main(job: Job, rank: int, device: str, run_id: str, work, events) -> None:
    """Body of each worker, thread or process: load once, then caption the files of the queue's chunks as they
    are decoded, until the queue says stop."""
    items = (item for chunk in iter(work.get, None) for item in chunk)
    with Pipeline(decode_workers(job), load_options(job)) as pipeline:
        ahead = job.batch_size or default_batch_size(device.partition(":")[0])
        # One device: decoding starts while the model loads, so the first batch is ready with it. With several,
        # a device whose model fails to load must not hold files that the others could caption.
        decoded = pipeline.decode(items, ahead) if len(job.devices) == 1 else None
        try:
            captioner = load_captioner(job, device)
        except Exception as error:
            events.put(("fatal", rank, device, f"{type(error).__name__}: {error}"))
            return
        writer = RecordWriter(job.output_dir, f"{run_id}-{rank}")

        def save(records: list[dict], relative: dict[str, Path]) -> None:
            writer.write(records)
            write_txt(job, records, relative)
            events.put(("records", rank, summarise_records(records), None))

        worker = Worker(job, captioner, save)
        loaded = (str(captioner.device), captioner.load_s) if captioner else ("cpu", 0.0)
        events.put(("loaded", rank, *loaded))
        worker.run(decoded or pipeline.decode(items, ahead))
    events.put(("exit", rank, device, None))


# ---- the main process: inputs, resume, workers, progress ------------------------------------------


def plan(job: Job) -> tuple[list[Item], int]:
    """The inputs still to do, and how many an earlier run already finished."""
    items = [item for item in discover(job.inputs) if in_shard(item, job.shard)]
    done = set() if job.overwrite else completed(load_records(job.output_dir))
    pending = []
    for item in items:
        try:
            identity = file_identity(item.path)
        except OSError:
            pending.append(item)  # reading it will record why it cannot be read
            continue
        key = done_key({**identity, "model": job.model_name, "task": job.task, "prompt": job.prompt_text})
        if key not in done:
            pending.append(item)
    return pending, len(items) - len(pending)


def _start_workers(job: Job, run_id: str, pending: list[Item]):
    """One thread for a single device; one spawned process per device for several (torch.multiprocessing)."""
    if len(job.devices) > 1:
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
        runner(target=_worker_main, args=(job, rank, device, run_id, work, events), daemon=True)
        for rank, device in enumerate(job.devices)
    ]
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


def _run_local(job: Job, run_id: str, pending: list[Item], progress: Progress) -> None:
    workers, work, events = _start_workers(job, run_id, pending)
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
    for worker in workers:
        worker.join(timeout=5)
    del work


def annotate(job: Job, progress: bool = True) -> Summary:
    """Run the job; return what happened. Records are in job.output_dir/annotations.jsonl."""
    started = time.perf_counter()
    job.output_dir.mkdir(parents=True, exist_ok=True)
    pending, skipped = plan(job)
    summary = Summary(total=len(pending) + skipped, skipped=skipped)
    if skipped:
        log.info("%d of %d files were finished by an earlier run", skipped, summary.total)
    if pending:
        tracker = Progress(summary, len(pending), progress, started)
        run_id = uuid.uuid4().hex[:8]
        if job.ray is not None:
            from .cluster import run_on_ray

            run_on_ray(job, run_id, pending, tracker)
        else:
            _run_local(job, run_id, pending, tracker)
        tracker.close()
        summary.not_processed = len(pending) - tracker.seen
    merge(job.output_dir)
    summary.elapsed_s = time.perf_counter() - started
    return summary


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
        lines.append(f"not processed  {summary.not_processed} (no worker left; run the command again)")
    for path, error in summary.failures:
        lines.append(f"  FAILED {path}: {error}")
    return "\n".join(lines)
