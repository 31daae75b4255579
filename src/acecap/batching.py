"""Batches: how clips are cut into batches a device can hold, run with out-of-memory retries, and (for the
server) how requests arriving one by one are collected into batches for a few milliseconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import devices
from .audio import Clip
from .captioner import AUDIO_TOKENS_PER_SECOND, Result
from .decode import cache_bytes_per_token
from .generate import Decoding

log = logging.getLogger("acecap")


@dataclass(frozen=True)
class BatchLimits:
    """What bounds a batch: its clips, its padding (transformers' generate() pads every clip to the
    longest, and padded positions cost as much as real ones) and the KV cache it needs."""

    clips: int
    padding: float | None = None  # largest share of padding; None: any (each clip is prefilled unpadded)
    cache_bytes: int | None = None  # KV cache the batch may take; None: no bound
    clip_bytes: int = 0  # KV cache of a clip's prompt and new tokens, its audio aside
    second_bytes: int = 0  # KV cache of one second of audio


def batches(clips: list[Clip], max_duration: float, limits: BatchLimits) -> Iterator[list[Clip]]:
    """Clips in order of length, cut into batches within `limits`."""
    batch: list[Clip] = []
    for clip in sorted(clips, key=lambda c: c.duration):
        candidate = batch + [clip]
        seconds = [min(c.duration, max_duration) for c in candidate]
        over = len(candidate) > limits.clips
        if limits.padding is not None:
            over |= len(candidate) * seconds[-1] > (1 + limits.padding) * sum(seconds)
        if limits.cache_bytes is not None:
            over |= len(candidate) * limits.clip_bytes + sum(seconds) * limits.second_bytes > limits.cache_bytes
        if batch and over:
            yield batch
            candidate = [clip]
        batch = candidate
    if batch:
        yield batch


def default_batch_size(kind: str) -> int:
    """64 clips on an accelerator, 32 on a CPU, where larger batches gained little."""
    return 32 if kind == "cpu" else 64


def batch_limits(captioner, decoding: Decoding, batch_size: int | None) -> BatchLimits:
    """At most `batch_size` clips (default: default_batch_size), within half the device's free memory for
    the KV cache."""
    per_token = cache_bytes_per_token(captioner.thinker)
    memory = devices.memory_info(captioner.device)
    return BatchLimits(
        clips=batch_size or default_batch_size(captioner.device.type),
        padding=0.25 if captioner.decoder == "transformers" else None,
        cache_bytes=memory[0] // 2 if memory else None,
        clip_bytes=(captioner.prompt_tokens + decoding.max_new_tokens) * per_token,
        second_bytes=AUDIO_TOKENS_PER_SECOND * per_token,
    )


def caption_splitting(
    captioner,
    clips: list[Clip],
    decoding: Decoding,
    max_duration: float,
    prompts: list[str] | None = None,
    on_token: Callable[[Clip, int], None] | None = None,
) -> list[Result | str]:
    """Caption a batch: a Result per clip, or the reason it failed. Out of memory halves the batch and retries;
    any other failure retries each clip alone, so only the clip at fault fails.

    `on_token(clip, token)` is called for each clip's new token after every decoding step (streaming).
    """
    streamed = False  # tokens already went out: a retry must not stream them again
    on_step = None
    if on_token is not None:

        def on_step(tokens: list[int]) -> None:
            nonlocal streamed
            streamed = True
            for clip, token in zip(clips, tokens, strict=True):
                on_token(clip, token)

    try:
        return captioner.caption_clips(clips, decoding, max_duration=max_duration, prompts=prompts, on_step=on_step)
    except Exception as error:
        out_of_memory = devices.is_out_of_memory(error)
        reason = f"{type(error).__name__}: {error}"
        if not out_of_memory:
            log.exception("a batch of %d failed on %s", len(clips), captioner.device)
    # Retry outside the except block: the exception's traceback holds the failed batch's tensors.
    if out_of_memory:
        devices.empty_cache(captioner.device)
    if len(clips) == 1:
        alone = f"device out of memory even for this clip alone ({clips[0].duration:.0f} s)"
        return [alone if out_of_memory else reason]
    if streamed:  # each retry's answer completes its stream from what was already sent
        on_token = None
    if not out_of_memory:
        log.warning("captioning the %d clips of the failed batch one by one", len(clips))
        return [
            caption_splitting(captioner, [clip], decoding, max_duration, [prompts[i]] if prompts else None, on_token)[0]
            for i, clip in enumerate(clips)
        ]
    log.warning("out of memory on a batch of %d; retrying in halves", len(clips))
    half = len(clips) // 2
    first, second = (prompts[:half], prompts[half:]) if prompts else (None, None)
    return caption_splitting(captioner, clips[:half], decoding, max_duration, first, on_token) + caption_splitting(
        captioner, clips[half:], decoding, max_duration, second, on_token
    )


class QueueFull(RuntimeError):
    """The batcher already holds as many waiting requests as it may."""


@dataclass(eq=False)
class Request:
    """One clip to caption for a caller who waits on `answer` (called once, from the batcher's thread)."""

    clip: Clip
    prompt: str
    decoding: Decoding
    answer: Callable[[Result | str], None]
    on_token: Callable[[int], None] | None = None  # each new token as it is decoded, for streaming
    cancelled: bool = False  # the caller gave up (timeout, disconnect): skipped if not yet started
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """A thread that takes waiting requests, at most `max_batch` at a time, and captions them together.

    When the device is idle the first request waits up to `max_wait_s` for company; while the device is
    busy requests pile up and the next batch takes them at once. Requests with different decoding settings
    run in separate batches, cut by `batches` to what the device's memory holds; a seeded sample alone.
    """

    def __init__(
        self,
        captioner,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        max_duration: float,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_s at least 0")
        self.captioner = captioner
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.max_duration = max_duration
        self.on_batch = on_batch  # (batch size, seconds) after every batch, for metrics
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.running = 0  # requests in the batch on the device now
        self._thread = threading.Thread(target=self._run, name="acecap-batcher", daemon=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every request already submitted, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
        self._queue.put(request)

    def _take(self, timeout: float | None) -> Request | None:
        """The next request, or None at the stop sentinel; raises queue.Empty after `timeout`."""
        request = self._queue.get(timeout=timeout)
        if request is not None:
            with self._lock:
                self._waiting -= 1
        return request

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._take(None)
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    request = self._take(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if request is None:
                    stopping = True  # run what was collected, then stop
                    break
                batch.append(request)
            live = [r for r in batch if not r.cancelled]
            try:
                self._run_batch(live)
            except Exception as error:  # a bug here must not leave callers waiting on a dead thread
                log.exception("a batch of %d requests failed", len(live))
                for request in live:
                    request.answer(f"{type(error).__name__}: {error}")

    def _run_batch(self, requests: list[Request]) -> None:
        by_decoding: dict[tuple[Decoding, int | None], list[Request]] = {}
        for request in requests:
            # A seeded sample runs alone: in a shared batch its draws would depend on its neighbours.
            seeded = request.decoding.temperature > 0 and request.decoding.seed is not None
            by_decoding.setdefault((request.decoding, id(request) if seeded else None), []).append(request)
        for (decoding, _), group in by_decoding.items():
            by_clip = {id(r.clip): r for r in group}
            limits = batch_limits(self.captioner, decoding, self.max_batch)
            for clips in batches([r.clip for r in group], self.max_duration, limits):
                members = [by_clip[id(c)] for c in clips]
                streaming = any(r.on_token for r in members)
                start = time.perf_counter()
                self.running = len(members)
                try:
                    results = caption_splitting(
                        self.captioner,
                        clips,
                        decoding,
                        self.max_duration,
                        [r.prompt for r in members],
                        _forward_tokens(by_clip) if streaming else None,
                    )
                finally:
                    self.running = 0
                if self.on_batch:
                    self.on_batch(len(members), time.perf_counter() - start)
                for request, result in zip(members, results, strict=True):
                    try:
                        request.answer(result)
                    except Exception:  # one caller's failure must not stop the thread serving the others
                        log.exception("answering a request failed")


def _forward_tokens(by_clip: dict[int, Request]) -> Callable[[Clip, int], None]:
    def forward(clip: Clip, token: int) -> None:
        request = by_clip[id(clip)]
        if request.on_token is None:
            return
        try:
            request.on_token(token)
        except Exception:  # a listener gone (its event loop closed) must not fail the batch's other rows
            log.exception("streaming a token failed; that request gets its answer at the end")
            request.on_token = None

    return forward
