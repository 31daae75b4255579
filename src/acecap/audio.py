"""Audio in: any common format, rate, depth and channel count → 16 kHz mono float32 clips.

libsndfile (soundfile) reads wav, flac, ogg/vorbis/opus and mp3 fast and exactly; PyAV, which bundles
FFmpeg's libraries, reads the rest (m4a/aac, wma, video containers). Both are pip wheels: no ffmpeg
binary is needed. Channels are averaged and the rate converted with soxr, as librosa.load does in the
model card's pipeline, so features match it.

Only what will be used is decoded: the first `max_seconds`, read and resampled a block at a time, so
memory holds the 16 kHz result and never the whole file at its own rate. The file's whole length comes
from its header (or, where it has none, from its packets, without decoding them). A file that holds less
than its header declares (a partial copy or download) is refused unless `allow_partial`.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lengths import (
    DECLARING_FORMATS,
    HEAD_BYTES,
    bytes_at,
    measured_end,
    mp3_declares_length,
    packet_end,
    pcm_declared_frames,
    pyav_open,
)

SAMPLE_RATE = 16000  # the model's feature extractor expects 16 kHz
BLOCK_FRAMES = 1 << 16  # frames read at a time
BLOCK_S = 10  # seconds resampled at a time
LOW_RATE = 1000  # below this (not audio anyone records) the rate is converted in one go
PARTIAL_TOLERANCE_S = 0.5  # encoder delay and padding: a file may hold this much less than it declares
MIN_SAMPLES = 321  # 3 mel frames: the fewest the encoder makes an audio token of (features.audio_tokens)


class AudioError(ValueError):
    """An input that cannot be used as audio, with a reason a person understands."""


@dataclass
class Clip:
    """Audio ready for the model: mono float32 samples at 16 kHz, at most as many as were asked for."""

    samples: np.ndarray
    source: str  # file path, or a label for arrays
    total_s: float | None = None  # the whole audio's length when `samples` holds only its start
    partial: str | None = None  # allow_partial: how the file falls short of what its header declares

    @property
    def duration(self) -> float:
        """The audio's length in seconds: the whole file's, even where only its start was decoded."""
        return self.total_s if self.total_s is not None else len(self.samples) / SAMPLE_RATE

    @property
    def decoded_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass
class _Read:
    """What one decoder made of a file."""

    samples: np.ndarray  # 16 kHz mono
    read_s: float  # seconds read, at the file's own rate
    total_s: float | None  # the whole length as far as known (header, count or estimate)
    declared_s: float | None  # the length the header declares, where the format writes one
    stopped: bool  # reading stopped at max_seconds with more audio after
    failed: str | None = None  # the decoder's error part-way through
    ends_s: float | None = None  # where the audio really ends, where a probe found it short of declared_s


class _Mixer:
    """Channels averaged and the rate converted block by block (soxr's stream gives the one-shot result).
    Each conversion makes at most BLOCK_S of output, whatever the rate: soxr's working memory follows it.
    Below LOW_RATE soxr's stream holds everything back until the end anyway, with more working memory
    than one conversion of the (then few) input frames, which is what is done."""

    def __init__(self, rate: int):
        import soxr

        if rate <= 0:
            raise AudioError(f"invalid sample rate {rate}")
        self.rate, self.step = rate, max(1, min(BLOCK_FRAMES, int(BLOCK_S * rate)))
        streams = rate >= LOW_RATE and rate != SAMPLE_RATE
        self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32", "HQ") if streams else None
        self.blocks: list[np.ndarray] = []  # at 16 kHz, or below LOW_RATE at the file's rate until the end
        self.frames = 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        for start in range(0, len(block), self.step):
            part = block[start : start + self.step]
            mono = part.mean(axis=1, dtype=np.float32) if part.ndim == 2 else part
            if not np.isfinite(mono).all():
                raise AudioError("contains NaN or infinite sample values")
            self.frames += len(mono)
            if self.stream is not None:
                mono = self.stream.resample_chunk(np.ascontiguousarray(mono), last=False)
            if len(mono):
                self.blocks.append(np.array(mono, dtype=np.float32))

    def samples(self) -> np.ndarray:
        import soxr

        if self.stream is not None:
            self.blocks.append(self.stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        samples = np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.float32)
        if self.rate < LOW_RATE and len(samples):
            samples = soxr.resample(samples, self.rate, SAMPLE_RATE, quality="HQ")
        return np.asarray(samples, dtype=np.float32)


def _opened(source: Path | bytes):
    """What soundfile opens: the path's own bytes (its name need not be UTF-8), or a file over the bytes."""
    return io.BytesIO(source) if isinstance(source, bytes) else os.fsencode(source)


def _read_soundfile(source: Path | bytes, max_seconds: float | None) -> _Read | None:
    """Read via libsndfile, or None if it does not know the format."""
    import soundfile

    try:
        handle = soundfile.SoundFile(_opened(source))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None
    with handle:
        rate, frames = handle.samplerate, handle.frames
        mixer = _Mixer(rate)
        declared, present = None, None
        if handle.format in ("WAV", "WAVEX", "RF64", "AIFF"):
            declared = pcm_declared_frames(bytes_at(source, 0, HEAD_BYTES))
            present = frames  # libsndfile counts the frames the file holds, whatever its header says
        elif handle.format == "FLAC" or (handle.format == "MP3" and mp3_declares_length(source)):
            declared = frames or None  # FLAC's STREAMINFO (0: not written), MP3's Xing frame count
        want = frames if max_seconds is None else min(frames, math.ceil(max_seconds * rate))
        failed, ended = None, False
        try:
            while mixer.frames < want:
                block = handle.read(min(BLOCK_FRAMES, want - mixer.frames), dtype="float32", always_2d=True)
                if not len(block):
                    ended = True
                    break
                mixer.add(block)
        except soundfile.LibsndfileError as error:
            failed = str(error) or f"libsndfile error {error.code}"
        stopped = failed is None and not ended and want < frames
        read = _Read(mixer.samples(), mixer.frames / rate, frames / rate, declared and declared / rate, stopped, failed)
        if stopped and declared and (declared - mixer.frames) / rate > PARTIAL_TOLERANCE_S:
            if present is None:  # is the end there? Read the last second the header promises
                probe = min(rate, declared - mixer.frames)
                try:
                    handle.seek(declared - probe)
                    present = declared - probe + len(handle.read(probe, dtype="float32"))
                except (soundfile.LibsndfileError, RuntimeError):
                    present = 0
                if (declared - present) / rate > PARTIAL_TOLERANCE_S:
                    present = round((measured_end(source) or read.read_s) * rate)
            if (declared - present) / rate > PARTIAL_TOLERANCE_S:
                read.ends_s = present / rate
        return read


def _read_pyav(source: Path | bytes, max_seconds: float | None) -> _Read:
    import av

    try:
        with pyav_open(source) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream in the file")
            stream = container.streams.audio[0]
            rate = stream.rate or 0
            if rate <= 0:
                raise AudioError("not an audio file, or a corrupt one (its audio stream has no sample rate)")
            mixer = _Mixer(rate)
            header_s = container.duration / 1e6 if container.duration else None
            if stream.duration and stream.time_base:
                header_s = float(stream.duration * stream.time_base)
            declared = header_s if container.format.name in DECLARING_FORMATS else None
            want = None if max_seconds is None else math.ceil(max_seconds * rate)
            # Packed float frames of the stream's own layout and rate; mixing and resampling happen in the mixer.
            resampler = av.AudioResampler(format="flt", layout=stream.layout, rate=rate)
            failed, stopped = None, False
            try:
                for frame in container.decode(stream):
                    for converted in resampler.resample(frame):
                        block = converted.to_ndarray().reshape(-1, stream.channels)
                        if want is not None and mixer.frames + len(block) >= want:
                            mixer.add(block[: want - mixer.frames])
                            stopped = True
                            break
                        mixer.add(block)
                    if stopped:
                        break
                else:
                    for converted in resampler.resample(None):
                        mixer.add(converted.to_ndarray().reshape(-1, stream.channels))
            except av.error.FFmpegError as error:
                if not mixer.frames:
                    raise
                failed = str(error)
            if stopped and header_s is None:  # no length anywhere: read the rest's packets, not their audio
                header_s = mixer.frames / rate
                try:
                    for packet in container.demux(stream):
                        header_s = max(header_s, packet_end(packet, stream) or 0.0)
                except av.error.FFmpegError:
                    pass  # a cut file: its length is what its packets reach
    except AudioError:
        raise
    except av.error.InvalidDataError:
        raise AudioError("not an audio file, or a corrupt one (no decoder recognises its data)") from None
    except (av.error.FFmpegError, ValueError) as error:
        raise AudioError(f"cannot decode: {error}") from None
    read = _Read(mixer.samples(), mixer.frames / rate, header_s, declared, stopped, failed)
    if not mixer.frames:
        raise AudioError("no audio could be decoded from it (corrupt, or not audio)")
    if stopped and declared and declared - read.read_s > PARTIAL_TOLERANCE_S:
        ends = measured_end(source, declared - 1.0)  # the packets of the last second the header promises
        if ends is None or declared - ends > PARTIAL_TOLERANCE_S:
            read.ends_s = measured_end(source) or read.read_s
    return read


PARTIAL_HINT = "; --allow-partial captions what is there"  # for the command line; serve leaves it out


def _clip(read: _Read, source: str, allow_partial: bool) -> Clip:
    """The read as a clip, or AudioError for a file that holds less than it declares (unless allowed)."""
    missing = None
    if read.failed:
        missing = f"cannot be decoded past {read.read_s:.2f} s ({read.failed})"
    elif read.ends_s is not None:
        missing = f"holds {read.ends_s:.2f} s of the {read.declared_s:.2f} s its header declares"
    elif not read.stopped and read.declared_s and read.declared_s - read.read_s > PARTIAL_TOLERANCE_S:
        missing = f"holds {read.read_s:.2f} s of the {read.declared_s:.2f} s its header declares"
    if missing and not allow_partial:
        raise AudioError(f"{missing}: cut short or damaged (a partial copy or download?){PARTIAL_HINT}")
    samples = np.ascontiguousarray(read.samples)
    if read.read_s == 0:
        raise AudioError("contains no audio samples (zero length)")
    if samples.size == 0:
        raise AudioError(f"{read.read_s:.2g} s of audio: no samples at all at {SAMPLE_RATE} Hz (zero length)")
    if samples.size < MIN_SAMPLES:
        raise AudioError(f"{samples.size / SAMPLE_RATE * 1000:.0f} ms of audio: too short for the model to hear "
                         f"anything (its encoder needs {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms)")  # fmt: skip
    if missing:
        total = read.ends_s if read.ends_s is not None else read.read_s
    else:
        total = read.total_s if read.stopped else None
    return Clip(samples=samples, source=source, total_s=total, partial=missing)


def _decode(source: Path | bytes, label: str, max_seconds: float | None, allow_partial: bool) -> Clip:
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    read = _read_soundfile(source, max_seconds)
    if read is None or read.read_s == 0:  # libsndfile does not know it, or read nothing: try FFmpeg
        try:
            read = _read_pyav(source, max_seconds)
        except AudioError:
            if read is None:
                raise
    return _clip(read, label, allow_partial)


def to_clip(samples: np.ndarray, sample_rate: int, source: str = "<array>") -> Clip:
    """Mix to mono, resample to 16 kHz and check a waveform given as (frames,) or (frames, channels): floats
    in [-1, 1], or integers scaled by their type's range (as a WAV file's PCM is)."""
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise AudioError(f"expected a 1-D or (frames, channels) array, got shape {samples.shape}")
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:  # librosa's and torchaudio's layout
        raise AudioError(f"shape {samples.shape} reads as {samples.shape[1]} channels of {samples.shape[0]} "
                         "frames: give (frames, channels), e.g. the array's .T")  # fmt: skip
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        middle = (int(info.max) + int(info.min) + 1) / 2  # 0, or 128 for unsigned 8-bit PCM
        samples = (samples.astype(np.float64) - middle) / (int(info.max) + 1 - middle)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"expected numbers, got an array of {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if len(samples) == 0:
        raise AudioError("contains no audio samples (zero length)")
    mixer = _Mixer(sample_rate)
    mixer.add(samples)
    return _clip(_Read(mixer.samples(), mixer.frames / sample_rate, None, None, False), source, False)


def _unreadable(error: OSError) -> str:
    if error.errno == errno.ENOENT:
        return "no such file"
    if error.errno == errno.ELOOP:
        return "a symlink loop: the link never reaches a file"
    return f"cannot read: {error.strerror or error}"


def load_audio(path: str | Path, max_seconds: float | None = None, allow_partial: bool = False) -> Clip:
    """Decode an audio file into a 16 kHz mono clip of at most `max_seconds` (the clip's duration is still the
    whole file's); raise AudioError with the reason when it cannot. A file holding less than its header
    declares is refused, or with `allow_partial` decoded as far as it goes and marked `partial`."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as error:
        raise AudioError(_unreadable(error)) from None
    except ValueError as error:  # a NUL in the name (from a manifest)
        raise AudioError(f"not a usable file name: {error}") from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioError("is a folder, not an audio file (acecap annotate takes folders)")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise AudioError("not a regular file (a pipe, socket or device)")
    if info.st_size == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise AudioError(_unreadable(error)) from None
    return _decode(path, str(path), max_seconds, allow_partial)


def decode_audio(
    data: bytes, source: str = "<bytes>", max_seconds: float | None = None, allow_partial: bool = False
) -> Clip:
    """Decode an audio file held in memory (an upload), as load_audio does; the format is read from the data."""
    if isinstance(data, (bytearray, memoryview)):  # bytes-like: anything but bytes is taken for a path below
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"decode_audio takes the file's bytes, not {type(data).__name__}: use load_audio for a path")
    if not data:
        raise AudioError("empty audio (0 bytes)")
    return _decode(data, source, max_seconds, allow_partial)
