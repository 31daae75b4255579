"""The input pipeline: audio files decoded and resampled to 16 kHz in worker processes, ahead of the device,
each clip handed over as float32 samples in shared memory.

mp3 decoding and resampling cost ~0.4 s of a core per 3-minute song, and Python threads hold the
interpreter lock for part of it, so a device fed by threads waits. Worker processes import only the audio
decoders (numpy, soundfile, soxr, PyAV), never torch or transformers, and start in a fraction of a second.
A decoded clip's samples are written into an anonymous shared-memory file (memfd) whose descriptor is
passed over the worker's socket: this process reads them straight into the clip's array (one copy, no
pickling) and closes the descriptor at once, so a batch of hundreds of clips holds no open files.

Bounded memory: each worker holds at most DEPTH files, and files are taken from the caller's iterable
only as the caller takes clips, so a slow consumer stops the workers after a few files.

Faults stay with their files: a file that fails to decode becomes that file's error (a Decoded without a
clip). A worker that dies (a decoder crash, a kill, or a file decoding for longer than `timeout_s`) costs
only its files: the one it was decoding is tried once more in a fresh worker, then becomes an error; the
files queued behind it go back in line. Workers read their work from a socket whose other end only this
process holds, so they exit when it does, even on kill -9.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .audio import AudioError, Clip, load_audio
from .inputs import Item
from .records import file_identity

DEPTH = 2  # files a worker holds: the one it decodes and the next, so it never waits for this process
ATTEMPTS = 2  # decodes of a file in which its worker died before the file is recorded as failed
DECODE_TIMEOUT_S = 600.0  # a file still decoding after this long is stuck (a FIFO, a hung mount)
HEADER = 8  # a message's length, ahead of its pickled bytes

# A worker imports acecap's audio modules without running the package's __init__, which loads torch and
# transformers (~1.5 s and ~1 GB per process): the package is registered as an empty module first.
_WORKER = """
import signal, sys, types
signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: Ctrl-C is the parent's, even while this one starts
package = types.ModuleType("acecap")
package.__path__ = [sys.argv[1]]
sys.modules["acecap"] = package
from acecap.pipeline import serve
serve(int(sys.argv[2]), int(sys.argv[3]))
"""
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for this process when the thread that started it ends


@dataclass
class Decoded:
    """One input file after decoding: its clip, or why there is none."""

    item: Item
    identity: dict
    clip: Clip | None
    error: str | None
    audio_s: float  # seconds spent decoding it


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


def default_workers(devices: int = 1) -> int:
    """Decode workers per device: the cores this process may use, less one for the device's own thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - devices) // devices)


@dataclass(eq=False)
class _Task:
    index: int
    item: Item
    attempts: int = 0  # decodes during which its worker died


class _Worker:
    """One decode process and this process's end of its socket."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package = str(Path(__file__).resolve().parent)
        command = [sys.executable, "-c", _WORKER, package, str(theirs.fileno()), str(os.getpid())]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()
        self.socket = ours
        self.tasks: collections.deque[_Task] = collections.deque()  # sent, in the order it decodes them
        self.busy_since = 0.0  # when it began the file at the head of `tasks`

    def send(self, task: _Task, options: dict) -> bool:
        """Hand it the task; False when the process has gone (the task was not taken)."""
        try:
            _send(self.socket, (task.index, str(task.item.path), options))
        except OSError:  # its end of the socket closed: it died while this one waited for the consumer
            return False
        if not self.tasks:
            self.busy_since = time.monotonic()
        self.tasks.append(task)
        return True

    def receive(self) -> dict | None:
        """The next result, or None when the worker has gone."""
        received = _receive(self.socket)
        if received is None:
            return None
        message, fds = received
        message["fd"] = fds[0] if fds else None
        return message

    def stop(self, kill: bool = False) -> str:
        """End the process; how it ended, for an error message."""
        self.socket.close()
        if kill:
            self.process.kill()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


class Pipeline:
    """Worker processes that decode files for one consumer (an annotate worker, a Ray actor)."""

    def __init__(self, workers: int, options: dict | None = None, timeout_s: float = DECODE_TIMEOUT_S):
        """`options`: keyword arguments of `decode_item` for every file (max_seconds, allow_partial)."""
        if workers < 1:
            raise ValueError("--decode-workers must be at least 1")
        self.size, self.options, self.timeout_s = workers, options or {}, timeout_s
        self.workers: list[_Worker] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self.workers]

    def close(self) -> None:
        """Stop decoding; its thread ends the workers (those mid-file are killed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def decode(self, items: Iterable[Item], ahead: int) -> Iterator[Decoded]:
        """Each item decoded, in the order they finish. Decoding starts now, in the background, and runs at
        most `ahead` files past what the caller has taken; `items` is read only as far as that."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a Pipeline decodes one iterable at a time")
        self._stop = stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._thread = threading.Thread(target=self._run, args=(iter(items), ready, stop), daemon=True,
                                        name="acecap-decode")  # fmt: skip
        self._thread.start()
        return self._results(ready, stop)

    def _results(self, ready: queue.Queue, stop: threading.Event) -> Iterator[Decoded]:
        try:
            while True:
                try:
                    decoded = ready.get(timeout=0.5)
                except queue.Empty:
                    if stop.is_set():  # closed: its thread ends without an end marker, so do not wait for one
                        return
                    continue
                if decoded is None:
                    return
                if isinstance(decoded, BaseException):
                    raise decoded
                yield decoded
        finally:
            stop.set()

    def _run(self, source: Iterator[Item], ready: queue.Queue, stop: threading.Event) -> None:
        def put(value) -> bool:
            while not stop.is_set():
                try:
                    ready.put(value, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for decoded in self._decode(source, stop):
                if not put(decoded):
                    break
            else:
                put(None)
        except BaseException as error:  # the caller's iterable failed, or a bug here: the consumer raises it
            put(error)
        finally:  # the workers live as long as this thread (they get a signal when it ends)
            for worker in self.workers:
                worker.stop(kill=bool(worker.tasks))
            self.workers = []

    def _decode(self, source: Iterator[Item], stop: threading.Event) -> Iterator[Decoded]:
        retry: collections.deque[_Task] = collections.deque()
        count = 0
        exhausted = False
        while not stop.is_set():
            while len(self.workers) < self.size:
                self.workers.append(_Worker())
            unusable = []  # items discovery already failed: their error, with nothing to decode
            for worker in list(self.workers):
                while len(worker.tasks) < DEPTH and (retry or not exhausted):
                    if retry:
                        task = retry.popleft()
                    else:
                        item = next(source, None)
                        if item is None:
                            exhausted = True
                            break
                        if item.error:
                            unusable.append(decode_item(item))
                            continue
                        task, count = _Task(count, item), count + 1
                    if not worker.send(task, self.options):
                        retry.appendleft(task)
                        unusable += self._finished_before_it_died(worker)
                        unusable += self._died(worker, worker.stop(), retry)
                        break
            yield from unusable
            if not any(worker.tasks for worker in self.workers):
                if retry:
                    continue  # a worker died before it took them: a fresh one will
                return
            yield from self._collect(retry)

    def _collect(self, retry: collections.deque) -> Iterator[Decoded]:
        """Wait for results (or deaths, or a file past its time) and hand them on."""
        busy = [worker for worker in self.workers if worker.tasks]
        deadline = min(worker.busy_since for worker in busy) + self.timeout_s
        # Woken at least twice a second, so that a stopped pipeline notices.
        ready = _wait([worker.socket for worker in busy], min(0.5, max(0.0, deadline - time.monotonic())))
        for worker in busy:
            if worker.socket in ready:
                message = worker.receive()
                if message is None:
                    yield from self._died(worker, worker.stop(), retry)
                    continue
                task = worker.tasks.popleft()
                worker.busy_since = time.monotonic()
                yield _decoded(task, message)
            elif time.monotonic() - worker.busy_since > self.timeout_s:
                reason = f"still decoding after {self.timeout_s:.0f} s"
                yield from self._died(worker, reason, retry, killed=True)

    @staticmethod
    def _finished_before_it_died(worker: _Worker) -> Iterator[Decoded]:
        """The results a dead worker sent before it went, still unread in its socket: not its fault."""
        while worker.tasks and (message := worker.receive()) is not None:
            yield _decoded(worker.tasks.popleft(), message)

    def _died(self, worker: _Worker, how: str, retry: collections.deque, killed: bool = False) -> Iterator[Decoded]:
        """A worker is gone: the file it was decoding gets another try or an error; the rest go back in line."""
        if killed:
            worker.stop(kill=True)
        self.workers.remove(worker)
        if not worker.tasks:  # it died between files
            return
        suspect, *queued = worker.tasks
        suspect.attempts += 1
        retry.extendleft(reversed(queued))
        if suspect.attempts < ATTEMPTS:
            retry.appendleft(suspect)
            return
        message = f"the decoder process failed on this file {ATTEMPTS} times ({how})"
        yield Decoded(suspect.item, identity_of(suspect.item), None, message, 0.0)


def _wait(sockets: list[socket.socket], timeout: float) -> set[socket.socket]:
    import selectors

    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        return {key.fileobj for key, _ in selector.select(timeout)}


def _decoded(task: _Task, message: dict) -> Decoded:
    """A worker's result as a Decoded, its samples mapped from the shared memory the worker filled."""
    clip, error = None, message["error"]
    if error is None:
        count, fd = message["samples"], message["fd"]
        samples, received = np.empty(count, dtype=np.float32), 0
        if fd is not None:
            try:
                received = _read_into(fd, memoryview(samples).cast("B"))
            finally:
                os.close(fd)
        if received == samples.nbytes:
            clip = Clip(samples=samples, **message["clip"])
        else:
            error = f"the decoder process handed over {received // 4} of the file's {count} samples"
    return Decoded(task.item, message["identity"], clip, error, message["audio_s"])


def _read_into(fd: int, view: memoryview) -> int:
    """Fill `view` from the start of the file `fd`; the bytes read (fewer only if the file is shorter)."""
    os.lseek(fd, 0, os.SEEK_SET)
    done = 0
    while done < len(view):
        got = os.readv(fd, [view[done:]])
        if not got:
            break
        done += got
    return done


# ---- the worker process ---------------------------------------------------------------------------


def serve(fd: int, parent: int) -> None:
    """A worker's loop: (index, path, options) in, the decoded clip's fields and samples out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which ends the workers
    if sys.platform.startswith("linux"):
        # Killed with the thread that started it, even while stuck in a read (a FIFO, a hung mount), where the
        # socket's end would go unnoticed.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent was gone before the signal was set
        return
    sock = socket.socket(fileno=fd)
    while True:
        received = _receive(sock)
        if received is None:
            return  # the parent has gone
        (index, path, options), _ = received
        decoded = decode_item(Item(Path(path), Path(path)), **options)
        message = {"index": index, "identity": decoded.identity, "error": decoded.error,
                   "audio_s": decoded.audio_s, "clip": None, "samples": 0}  # fmt: skip
        fds = []
        if decoded.clip is not None:
            clip = decoded.clip
            message["clip"] = {f.name: getattr(clip, f.name) for f in fields(clip) if f.name != "samples"}
            message["samples"] = len(clip.samples)
            if len(clip.samples):
                fds.append(_shared(np.ascontiguousarray(clip.samples, dtype=np.float32)))
        try:
            _send(sock, message, fds)
        except OSError:
            return
        finally:
            for handle in fds:
                os.close(handle)


def _send(sock: socket.socket, message, fds: list[int] = ()) -> None:
    """One message: its length and pickled bytes, with any file descriptors riding on its first bytes."""
    data = pickle.dumps(message)
    sent = socket.send_fds(sock, [len(data).to_bytes(HEADER, "little"), data], list(fds))
    if sent < HEADER + len(data):
        sock.sendall((len(data).to_bytes(HEADER, "little") + data)[sent:])


def _receive(sock: socket.socket) -> tuple[object, list[int]] | None:
    """The next message and its file descriptors, or None at the end of the stream (or a broken one)."""
    try:
        header, fds, _, _ = socket.recv_fds(sock, HEADER, 1)
        while 0 < len(header) < HEADER:
            chunk = sock.recv(HEADER - len(header))
            if not chunk:
                break
            header += chunk
        if len(header) < HEADER:
            return None
        size = int.from_bytes(header, "little")
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    return pickle.loads(data), list(fds)


def _shared(samples: np.ndarray) -> int:
    """An anonymous file holding the samples: a memfd (in memory) where the system has them."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("acecap-clip", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    view = memoryview(samples).cast("B")
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return fd
