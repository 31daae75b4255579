"""Shared fixtures: the tiny checkpoint (built once per session) and real audio files of many kinds."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from acecap.tiny import write_tiny

RATE = 44100


def tone(seconds: float, rate: int = RATE, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encode_with_pyav(path: Path, samples: np.ndarray, rate: int, codec: str, movflags: str | None = None) -> Path:
    """Write mono float samples with an FFmpeg encoder (aac for .m4a, libopus for .opus); `movflags`
    "+faststart" puts an mp4's index before its audio."""
    import av

    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_size = 960 if codec == "libopus" else 1024
        for start in range(0, len(samples), frame_size):
            chunk = samples[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def pcm_wav(path: Path, samples: np.ndarray, rate: int, declared_frames: int | None = None) -> Path:
    """A 16-bit mono WAV written by hand, so its header may declare more (or a stranger rate) than it holds."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    declared = len(data) if declared_frames is None else declared_frames * 2
    header = b"RIFF" + struct.pack("<I", 36 + declared) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + b"data" + struct.pack("<I", declared) + data)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """wav, flac, mp3, ogg, opus and m4a files of a 3 s tone, plus a 44.1 kHz stereo 24-bit wav."""
    folder = tmp_path_factory.mktemp("audio")
    mono = tone(3.0)
    soundfile.write(folder / "tone.wav", mono, RATE)
    soundfile.write(folder / "tone.flac", mono, RATE)
    soundfile.write(folder / "tone.mp3", mono, RATE)
    soundfile.write(folder / "tone.ogg", mono, RATE)
    soundfile.write(folder / "stereo24.wav", np.stack([mono, 0.5 * mono], axis=1), RATE, subtype="PCM_24")
    encode_with_pyav(folder / "tone.opus", tone(3.0, 48000), 48000, "libopus")
    encode_with_pyav(folder / "tone.m4a", mono, RATE, "aac")
    (folder / "notes.txt").write_text("this is not audio\n")
    (folder / "empty.wav").write_bytes(b"")
    return folder


def run_acecap(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "acecap", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
