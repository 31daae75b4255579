"""`acecap annotate --ray`: the same job on a Ray cluster, one actor per NPU or GPU.

Each actor loads the model once and runs acecap's own batching on the chunks of files it is handed; the
records come back to this process, which writes them exactly as a local run does (same schema, same part
files, same resume rules). Input files must be at the same path on every node (a shared filesystem).

Faults: Ray restarts an actor whose process dies and retries its call, so a crash costs only the chunk in
flight. A chunk that still fails is retried file by file, and a file that fails every time becomes an error
record instead of an endless retry.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections import deque
from pathlib import Path

from .batching import default_batch_size
from .inputs import Item
from .job import CHUNK_FILES, Job
from .pipeline import Decoded, Pipeline, identity_of
from .progress import Progress
from .records import RecordWriter
from .worker import Worker, commit, load_captioner, summarise_records

log = logging.getLogger("acecap")

ATTEMPTS = 3  # tries of one call (Ray's retries included) before a chunk is split or a file given up
# What one actor asks Ray for: a whole card (Ascend nodes advertise "NPU"), or a CPU core for testing.
ACTOR_RESOURCES = {"npu": {"resources": {"NPU": 1}}, "cuda": {"num_gpus": 1}, "cpu": {"num_cpus": 1}}


def cluster_kind(requested: str, resources: dict[str, float]) -> str:
    """The actors' device kind: the one asked for, else NPU, then GPU, then CPU, by what the cluster has."""
    kind = requested.split(":")[0]
    if kind in ACTOR_RESOURCES:
        return kind
    if kind != "auto":
        raise ValueError(f"--device {requested!r} on Ray: use npu, cuda, cpu or auto (cards are Ray's to assign)")
    return "npu" if resources.get("NPU", 0) >= 1 else "cuda" if resources.get("GPU", 0) >= 1 else "cpu"


def actor_count(kind: str, resources: dict[str, float], requested: int | None) -> int:
    """One actor per card of that kind in the cluster (one on a CPU-only cluster) unless asked otherwise."""
    if requested is not None:
        if requested < 1:
            raise ValueError("--ray-actors must be at least 1")
        return requested
    cards = int(resources.get({"npu": "NPU", "cuda": "GPU"}.get(kind, ""), 0))
    if kind != "cpu" and cards < 1:
        raise ValueError(f"the Ray cluster has no {kind.upper()} resource; start its nodes with the cards visible")
    return cards if kind != "cpu" else 1


class Annotator:
    """A Ray actor: the model on the card Ray gave it (its only visible one), and chunks of files in."""

    def __init__(self, job: Job, kind: str):
        self.job = job
        self.captioner = load_captioner(job, kind)
        self.device_lock = threading.Lock()  # two calls run at once: one decodes files while one captions
        self.saved: list[tuple[list[dict], dict[str, Path]]] = []  # the running call's records
        self.worker = Worker(job, self.captioner, lambda records, relative: self.saved.append((records, relative)))

    def info(self) -> tuple[str, float, int]:
        device = f"{socket.gethostname()}:{self.captioner.device if self.captioner else 'cpu'}"
        return device, self.captioner.load_s if self.captioner else 0.0, os.getpid()

    def run(self, items: list[Item]) -> list[tuple[list[dict], dict[str, Path]]]:
        # Decoded outside the lock: while one call's chunk is on the device, the next one's is decoded.
        with Pipeline(self.job.decode_workers, self.worker.decode_options) as pipeline:
            decoded = list(pipeline.decode(items, ahead=len(items)))
        with self.device_lock:
            self.saved = []
            self.worker.run(decoded)
            return self.saved


def _error_record(job: Job, item: Item, error: str) -> dict:
    return Worker(job, None, lambda *_: None).record(Decoded(item, identity_of(item), None, error, 0.0))


def run_on_ray(job: Job, run_id: str, pending: list[Item], progress: Progress) -> None:
    """Annotate `pending` on the Ray cluster at job.ray (connecting, or starting a local one for "")."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    if not ray.is_initialized():
        ray.init(address=job.ray or None, log_to_driver=False)
    resources = ray.cluster_resources()
    kind = cluster_kind(job.devices[0], resources)
    count = actor_count(kind, resources, job.ray_actors)
    # Unless told, each actor decodes with an equal share of the cluster's cores (one kept for its device).
    workers = job.decode_workers or max(1, int(resources.get("CPU", 1)) // count - 1)
    job = dataclasses.replace(job, decode_workers=workers)
    # Actors run in the folder `ray start` ran in, not this one: every path they are given is absolute.
    if job.model and os.path.isdir(job.model):
        job = dataclasses.replace(job, model=os.path.abspath(job.model))
    pending = [dataclasses.replace(item, path=Path(os.path.abspath(item.path))) for item in pending]
    remote = ray.remote(max_restarts=4 * ATTEMPTS, max_task_retries=ATTEMPTS - 1, max_concurrency=2)(Annotator)
    actors = [remote.options(**ACTOR_RESOURCES[kind]).remote(job, kind) for _ in range(count)]
    devices: dict[int, str] = {}
    for rank, actor in enumerate(actors):
        try:
            device, load_s, pid = ray.get(actor.info.remote())
        except RayError as error:
            log.error("Ray actor %d could not start: %s", rank, error)
            continue
        devices[rank] = device
        progress.loaded(rank, f"{device} (pid {pid})", load_s)
    writer = RecordWriter(job.output_dir, f"{run_id}-ray")
    # A chunk is a batch's worth of files, so a crash costs at most one batch, and every actor gets work.
    batch = job.batch_size or default_batch_size(kind)
    size = max(1, min(CHUNK_FILES, batch, -(-len(pending) // max(1, len(devices)))))
    chunks = deque(pending[begin : begin + size] for begin in range(0, len(pending), size))
    running: dict = {}  # the call's ref → (rank, items)

    def hand_out(rank: int) -> None:
        if chunks:
            items = chunks.popleft()
            running[actors[rank].run.remote(items)] = (rank, items)

    for rank in devices:  # two chunks each: the next is queued on the actor while one runs
        hand_out(rank)
        hand_out(rank)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        rank, items = running.pop(ref)
        try:
            saved = ray.get(ref)
        except RayError as error:
            saved = _after_failure(job, items, rank, error, chunks)
            try:
                ray.get(actors[rank].info.remote(), timeout=600)  # restarted, or gone for good?
            except (RayError, GetTimeoutError):
                log.error("Ray actor %d is gone; the others go on", rank)
                devices.pop(rank, None)
        for records, relative in saved:
            records = commit(job, writer, records, relative)
            progress.records(rank, devices.get(rank, f"actor {rank}"), summarise_records(records))
        if rank in devices:
            hand_out(rank)
        elif chunks and not running and devices:
            hand_out(next(iter(devices)))
    writer.close()
    for actor in actors:
        ray.kill(actor)


def _after_failure(job: Job, items: list[Item], rank: int, error: Exception, chunks: deque) -> list:
    """A chunk's files go back one by one; a single file that failed every try becomes an error record."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(items) > 1:
        log.warning("a chunk of %d files failed %d times on Ray actor %d (%s); retrying them one by one",
                    len(items), ATTEMPTS, rank, reason)  # fmt: skip
        chunks.extendleft([item] for item in reversed(items))
        return []
    message = f"failed {ATTEMPTS} times on Ray (its worker died or raised): {reason}"
    return [([_error_record(job, items[0], message)], {})]
