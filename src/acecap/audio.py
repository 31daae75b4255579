"""Audio in: any common format, rate, depth and channel count → 16 kHz mono float32 clips.

libsndfile (soundfile) reads wav, flac, ogg/vorbis/opus and mp3 fast and exactly; PyAV, which bundles
FFmpeg's libraries, reads the rest (m4a/aac, wma, video containers). Both are pip wheels: no ffmpeg
binary is needed. Channels are averaged and the rate converted with soxr, as librosa.load does in the
model card's pipeline, so features match it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # the model's feature extractor expects 16 kHz


class AudioError(ValueError):
    """An input that cannot be used as audio, with a reason a person understands."""


@dataclass
class Clip:
    """Audio ready for the model: mono float32 samples at 16 kHz."""

    samples: np.ndarray
    source: str  # file path, or a label for arrays

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def _opened(source: Path | bytes):
    """What soundfile and PyAV open: a path, or a fresh in-memory file over the bytes."""
    return io.BytesIO(source) if isinstance(source, bytes) else str(source)


def _read_soundfile(source: Path | bytes) -> tuple[np.ndarray, int] | None:
    """(frames × channels, rate) via libsndfile, or None if it does not know the format."""
    import soundfile

    try:
        data, rate = soundfile.read(_opened(source), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError:
        return None
    return data, rate


def _read_pyav(source: Path | bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(_opened(source)) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream in the file")
            stream = container.streams.audio[0]
            # Packed float frames of the stream's own layout and rate; mixing and resampling happen below.
            resampler = av.AudioResampler(format="flt", layout=stream.layout, rate=stream.rate)
            chunks = []
            for frame in container.decode(stream):
                for converted in resampler.resample(frame):
                    chunks.append(converted.to_ndarray().reshape(-1, stream.channels))
            for converted in resampler.resample(None):
                chunks.append(converted.to_ndarray().reshape(-1, stream.channels))
            rate = stream.rate
    except AudioError:
        raise
    except av.error.InvalidDataError:
        raise AudioError("not an audio file, or a corrupt one (no decoder recognises its data)") from None
    except (av.error.FFmpegError, ValueError) as error:
        raise AudioError(f"cannot decode: {error}") from None
    if not chunks:
        raise AudioError("no audio could be decoded from it (corrupt, or not audio)")
    return np.concatenate(chunks).astype(np.float32, copy=False), rate


def to_clip(samples: np.ndarray, sample_rate: int, source: str = "<array>") -> Clip:
    """Mix to mono, resample to 16 kHz and check a waveform given as (frames,) or (frames, channels)."""
    import soxr

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"expected a 1-D or (frames, channels) array, got shape {samples.shape}")
    if samples.size == 0:
        raise AudioError("contains no audio samples (zero length)")
    if not np.isfinite(samples).all():
        raise AudioError("contains NaN or infinite sample values")
    if sample_rate <= 0:
        raise AudioError(f"invalid sample rate {sample_rate}")
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return Clip(samples=np.ascontiguousarray(samples), source=source)


def load_audio(path: str | Path) -> Clip:
    """Decode an audio file into a 16 kHz mono clip; raise AudioError with the reason when it cannot."""
    path = Path(path)
    if not path.exists():
        raise AudioError("no such file")
    if path.is_dir():
        raise AudioError("is a folder, not an audio file (acecap annotate takes folders)")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as error:
        raise AudioError(f"cannot read: {error.strerror}") from None
    if size == 0:
        raise AudioError("empty file (0 bytes)")
    decoded = _read_soundfile(path) or _read_pyav(path)
    return to_clip(*decoded, source=str(path))


def decode_audio(data: bytes, source: str = "<bytes>") -> Clip:
    """Decode a whole audio file held in memory (an upload); the format is read from the data itself."""
    if not data:
        raise AudioError("empty audio (0 bytes)")
    decoded = _read_soundfile(data) or _read_pyav(data)
    return to_clip(*decoded, source=source)
