"""Continuous batching: clips stream in, each takes a row of the decoder, and a row whose clip has ended
takes the next clip that fits it, so the decode batch stays full instead of shrinking to its last caption.

A wave is one decoder (its rows and their cache capacities, laid out for the longest clips waiting). Rows
freed by an end token are filled again, several at a time, with the longest waiting clips that fit their
capacity; a clip longer than every row waits for the next wave, which starts once the current one has no
row left. Out of memory halves the rows and runs the wave's clips again; any other failure runs the wave's
clips one at a time, so only the clip that fails alone gets an error.
"""

from __future__ import annotations

import bisect
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import devices
from .decode import cache_slots
from .waves import Finished, Pending, Wave, finished_of

log = logging.getLogger("acecap")

# Free rows are filled once an eighth of the wave is free (or no more clips will come): prefill runs on
# several clips at once, and the decode batch never falls far below full.
REFILL_SHARE = 8
# Clips held waiting, per row of the wave: each free row has lengths to choose from, and host memory stays
# bounded (with the clips in the rows, 3 x 64 three-minute clips at 16 kHz in float32: 2.2 GB).
WAITING_PER_ROW = 2


def stream(
    make_wave: Callable[[list[int]], Wave],
    source: Iterable[Pending],
    end_ids: list[int],
    device: torch.device,
    *,
    rows: int,
    cache_tokens: int | None = None,
    padding: float | None = None,
    on_step: Callable[[list[tuple[Any, int]]], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[Any, Finished | str]]:
    """Each clip's key with its tokens, or with the reason it failed, as clips end.

    `make_wave(capacities)` builds a wave of rows of these capacities (ascending). A wave takes at most `rows`
    clips, within `cache_tokens` KV cache slots; with `padding` (padded batches), at most that share of it.
    Once `stop()` is true no clip starts: those on the device finish, the others get no outcome.
    """
    feed = _Feed(source)
    waiting: list[Pending] = []  # by need, ascending
    needs: list[int] = []
    alone: list[Pending] = []  # a failed wave's clips, to be run one at a time
    wave: Wave | None = None
    chosen: list[Pending] = []
    try:
        while True:
            busy = wave is not None and bool(wave.rows)
            if stop is not None and stop():  # nothing new starts; the clips left wait for another run
                for held in (waiting, needs, alone):
                    held.clear()
            else:
                room = WAITING_PER_ROW * rows - len(waiting)
                # Block only when the device has nothing to do and a wave would start short of rows.
                block = not busy and not alone and len(waiting) < rows and not feed.ended
                for pending in feed.take(room, block):
                    at = bisect.bisect(needs, pending.need)
                    waiting.insert(at, pending)
                    needs.insert(at, pending.need)
                if not busy and block:
                    continue  # waited for one more clip; look again
            try:
                if not busy:
                    wave = None
                    if alone:
                        chosen = [alone.pop()]
                    elif waiting:
                        chosen = _choose(waiting, needs, rows, cache_tokens, padding)
                    else:
                        break  # nothing waiting, nothing to come
                    wave = make_wave(sorted(p.need for p in chosen))
                    chosen.sort(key=lambda p: p.need)
                    wave.fill(list(enumerate(chosen)))
                elif not alone:
                    _refill(wave, waiting, needs, feed.ended)
                for row in wave.advance(on_step):
                    yield row.pending.key, finished_of(row, end_ids)
                continue
            except Exception as error:
                failed = [row.pending for row in wave.rows.values()] if wave is not None else chosen
                if not failed:
                    raise  # no clip was on the device: not a clip's failure
                wave = None
                out_of_memory = devices.is_out_of_memory(error)
                reason = f"{type(error).__name__}: {error}"
                if not out_of_memory:
                    log.exception("captioning %d clip(s) on %s failed", len(failed), device)
            # Outside the except block, whose traceback holds the failed wave's tensors.
            devices.empty_cache(device)
            yield from _after_failure(out_of_memory, reason, failed, alone, waiting, needs)
            if out_of_memory and len(failed) > 1:
                rows = max(1, min(rows, len(failed)) // 2)
                log.warning("out of memory with %d clips in the batch; going on with at most %d", len(failed), rows)
    finally:
        feed.stop()


def _after_failure(out_of_memory: bool, reason: str, failed: list[Pending], alone: list, waiting: list, needs: list):
    """Where a failed wave's clips go: back to wait (out of memory), to run alone (any other error), or, when
    the clip ran alone, an error for it."""
    if len(failed) == 1:
        pending = failed[0]
        if out_of_memory:
            reason = f"device out of memory even for this clip alone ({pending.seconds:.0f} s)"
        yield pending.key, reason
    elif out_of_memory:
        for pending in failed:
            at = bisect.bisect(needs, pending.need)
            waiting.insert(at, pending)
            needs.insert(at, pending.need)
    else:
        alone.extend(reversed(failed))


def _choose(waiting: list[Pending], needs: list[int], rows: int, cache_tokens: int | None, padding: float | None):
    """The longest waiting clips that fit a new wave (at least one), taken out of `waiting`."""
    chosen: list[int] = []
    for index in range(len(waiting) - 1, -1, -1):
        if len(chosen) == rows:
            break
        candidate = [waiting[i].need for i in chosen] + [waiting[index].need]
        if chosen and cache_tokens is not None and cache_slots(sorted(candidate)) > cache_tokens:
            continue  # a shorter clip may still fit
        if chosen and padding is not None:
            seconds = [waiting[i].seconds for i in chosen] + [waiting[index].seconds]
            if len(seconds) * seconds[0] > (1 + padding) * sum(seconds):
                break  # shorter clips only pad more
        chosen.append(index)
    picked = [waiting[i] for i in chosen]
    for index in sorted(chosen, reverse=True):
        del waiting[index]
        del needs[index]
    return picked


def _refill(wave: Wave, waiting: list[Pending], needs: list[int], no_more: bool) -> None:
    """Fill free rows with the longest waiting clips that fit them, once enough rows are free."""
    free = [row for row in range(len(wave.capacities)) if row not in wave.rows]
    if not free or not waiting or (len(free) < max(1, len(wave.capacities) // REFILL_SHARE) and not no_more):
        return
    assignments = []
    for row in sorted(free, key=lambda r: wave.capacities[r], reverse=True):
        fits = bisect.bisect(needs, wave.capacities[row])
        if fits == 0:
            continue
        assignments.append((row, waiting.pop(fits - 1)))
        del needs[fits - 1]
    if assignments:
        wave.fill(assignments)


class _Feed:
    """Clips from the caller's iterable, pulled by a thread, so the device never waits on the next one."""

    END = object()

    def __init__(self, source: Iterable[Pending]):
        self.items: queue.Queue = queue.Queue(maxsize=2)
        self.ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(iter(source),), daemon=True, name="acecap-feed")
        self._thread.start()

    def _pull(self, source: Iterator[Pending]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as error:  # the caller's iterator failed: the stream raises it
            self._put(error)
            return
        self._put(self.END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, most: int, block: bool) -> list[Pending]:
        """Up to `most` clips ready now (with `block`, waiting for the first)."""
        taken: list[Pending] = []
        while len(taken) < most and not self.ended:
            try:
                item = self.items.get(block=block and not taken)
            except queue.Empty:
                break
            if item is self.END:
                self.ended = True
            elif isinstance(item, BaseException):
                self.ended = True
                raise item
            else:
                taken.append(item)
        return taken

    def stop(self) -> None:
        self._stop.set()
