"""Audio with no beat, made two ways, for the meta task's tempo: a tempo read from it is a guess, and its
confidence should say so.

- `noise` (numpy, sample by sample): white, pink or brown noise under slow swells (wind, rain, a room), or a
  drone of a few harmonic tones with slow vibrato and tremolo, or a slow glide.
- `pads` (a MIDI score rendered by fluidsynth with FluidR3 GM, as meta_scores.py renders): sustained chords on
  pad, string, organ and choir programs that change at irregular times (every 2.5 to 9 s), no drums and
  no melody: ambient music without a pulse.

Truth: no tempo and no metre; the drones and pads have a key, which is not scored here.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from meta_scores import SOUNDFONTS

RATE = 44100
PAD_PROGRAMS = (19, 48, 49, 50, 52, 88, 89, 90, 91, 92, 94, 95)  # organ, strings, choir, synth pads


def _noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    frequencies = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 20.0)
    spectrum /= frequencies ** (0.5 if colour == "pink" else 1.0)
    return np.fft.irfft(spectrum, n)


def _swell(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A slow, irregular loudness: two incommensurate waves of 4-20 s."""
    periods = rng.uniform(4.0, 20.0, 2)
    phases = rng.uniform(0, 2 * np.pi, 2)
    return 1.0 + 0.4 * np.sin(2 * np.pi * t / periods[0] + phases[0]) * np.sin(2 * np.pi * t / periods[1] + phases[1])


def noise_clip(seed: int, seconds: float) -> tuple[np.ndarray, dict]:
    """One numpy clip: noise, a drone or a glide (chosen by the seed)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    kind = ("white", "pink", "brown", "drone", "glide")[seed % 5]
    if kind == "drone":
        root = 55.0 * 2 ** rng.uniform(0, 3)
        vibrato = 1 + 0.003 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t)
        tones = [root * ratio for ratio in (1, 1.5, 2, 3)[: rng.integers(2, 5)]]
        mono = sum(np.sin(2 * np.pi * np.cumsum(np.full(n, f) * vibrato) / RATE) / (i + 1) for i, f in enumerate(tones))
        detail = f"drone of {len(tones)} tones on {root:.0f} Hz"
    elif kind == "glide":
        low, high = sorted(rng.uniform(100, 1000, 2))
        frequency = low + (high - low) * (0.5 - 0.5 * np.cos(2 * np.pi * t / seconds))
        mono = np.sin(2 * np.pi * np.cumsum(frequency) / RATE)
        detail = f"glide {low:.0f}-{high:.0f} Hz"
    else:
        mono = _noise(rng, n, kind)
        detail = f"{kind} noise"
    mono = mono * _swell(rng, t)
    mono = (0.5 * mono / (np.abs(mono).max() or 1.0)).astype(np.float32)
    return np.stack([mono, mono], axis=1), {"name": f"noise{seed}", "detail": detail}


def pad_clip(seed: int, seconds: float) -> tuple[np.ndarray, dict]:
    """One fluidsynth clip: held chords changing at irregular times."""
    import mido

    rng = np.random.default_rng(seed)
    program = int(rng.choice(PAD_PROGRAMS))
    ticks = 480  # at the default 120 BPM: 960 ticks a second
    midi = mido.MidiFile(ticks_per_beat=ticks)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.Message("program_change", channel=0, program=program, time=0))
    root, at, chords = 48 + int(rng.integers(0, 12)), 0.0, 0
    events = []
    while at < seconds:
        length = float(rng.uniform(2.5, 9.0))
        quality = (0, 4, 7) if rng.random() < 0.5 else (0, 3, 7)
        pitches = [root + interval + 12 * int(rng.integers(0, 2)) for interval in quality]
        velocity = int(rng.integers(50, 90))
        for pitch in pitches:
            events.append((at, mido.Message("note_on", channel=0, note=pitch, velocity=velocity)))
            events.append((at + length + 0.3, mido.Message("note_off", channel=0, note=pitch)))  # held into the next
        root += int(rng.choice((-5, -3, 2, 5, 7)))
        root = 48 + (root - 48) % 12
        at += length
        chords += 1
    events.sort(key=lambda e: (e[0], e[1].type == "note_on"))
    now = 0
    for when, message in events:
        tick = int(round(when * 2 * ticks))
        track.append(message.copy(time=tick - now))
        now = tick
    soundfont = next(p for p in SOUNDFONTS if Path(p).is_file())
    with tempfile.TemporaryDirectory(prefix="acecap-pads-") as scratch:
        midi_path, wav_path = Path(scratch) / "pads.mid", Path(scratch) / "pads.wav"
        midi.save(midi_path)
        subprocess.run(
            ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(RATE), "-F", str(wav_path), soundfont, str(midi_path)],
            check=True, capture_output=True,
        )  # fmt: skip
        audio, _ = soundfile.read(wav_path, dtype="float32", always_2d=True)
    audio = audio[: int(seconds * RATE)]
    audio = 0.8 * audio / (float(np.abs(audio).max()) or 1.0)
    return audio.astype(np.float32), {"name": f"pads{seed}", "detail": f"{chords} held chords, GM program {program}"}


def clips(count: int, first_seed: int, seconds: float):
    """`count` clips, alternately numpy and fluidsynth, each with its truth (no tempo, metre or key scored)."""
    for index in range(count):
        seed = first_seed + index
        audio, truth = (noise_clip if index % 2 == 0 else pad_clip)(seed, seconds)
        yield audio, {**truth, "bpm": None, "timesignature": None, "key": None}
