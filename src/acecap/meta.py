"""Tempo, key and time signature from the signal (the `meta` task; no model).

ACE-Step's own tutorial warns that language-model labels get BPM and key wrong and tells users to take them
from an estimator. This one uses librosa: an onset-strength tempogram for tempo, the beat tracker and the
accent pattern over beats for the metre, and Krumhansl–Kessler key profiles over a constant-Q chroma.
Each value comes with a confidence in [0, 1]. Accuracy on material of known tempo, key and metre is
measured by `benchmarks/meta.py` (results in docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .audio import SAMPLE_RATE

PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Krumhansl & Kessler (1982) probe-tone ratings, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
HOP = 256  # 16 ms at 16 kHz
TEMPO_RANGE = (50.0, 210.0)  # BPM a song is written in; outside it the half or double is meant
STEADY = 0.6  # alternate beats at least this alike: a beat grid, not one at twice the tempo
SHORTEST_S = 4.0  # below this there are too few beats to say anything


@dataclass(frozen=True)
class Meta:
    duration: float
    bpm: int | None
    bpm_confidence: float
    keyscale: str | None  # "C major", "F# minor"
    keyscale_confidence: float
    timesignature: int | None  # beats per bar (ACE-Step writes 4 for 4/4, 3 for 3/4)
    timesignature_confidence: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """'96 BPM, D major, 3/4', or what was found of it."""
        found = [
            f"{self.bpm} BPM" if self.bpm else None,
            self.keyscale,
            f"{self.timesignature}/4" if self.timesignature else None,
        ]
        return ", ".join(f for f in found if f) or "no tempo or key"


def analyse(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Meta:
    """Tempo, key and metre of mono float samples; None (confidence 0) where the clip is too short or silent."""
    duration = len(samples) / sample_rate
    if duration < SHORTEST_S or not np.any(np.abs(samples) > 1e-4):
        return Meta(round(duration, 3), None, 0.0, None, 0.0, None, 0.0)
    samples = np.asarray(samples, dtype=np.float32)
    onsets = _onsets(samples, sample_rate)
    bpm, bpm_confidence, beat_frames = _tempo(onsets, sample_rate)
    beats, beat_confidence = _metre(samples, beat_frames, sample_rate)
    key, key_confidence = _key(samples, sample_rate)
    return Meta(
        duration=round(duration, 3),
        bpm=int(round(bpm)),
        bpm_confidence=round(bpm_confidence, 3),
        keyscale=key,
        keyscale_confidence=round(key_confidence, 3),
        timesignature=beats,
        timesignature_confidence=round(beat_confidence, 3),
    )


def _onsets(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset strength with the low band (kick, bass) and the rest (snare, hats, chords) weighed equally:
    a kick moves few mel bands, a snare many, yet both mark beats."""
    import librosa

    bands = librosa.onset.onset_strength_multi(
        y=samples, sr=sample_rate, hop_length=HOP, channels=[0, 16, 128], n_mels=128, fmax=sample_rate / 2
    )
    bands = bands / (bands.max(axis=1, keepdims=True) + 1e-9)
    return bands.sum(axis=0)


def _periodicity(onsets: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """The onset envelope's strongest periodicity (BPM), weighed by a prior over tempi, and its strength.

    The prior is log-normal around 120 BPM, one octave wide, as librosa's tempo estimator uses. The peak is
    interpolated between lags: a whole frame is 16 ms, ~7 BPM at 170 BPM.
    """
    import librosa

    correlation = librosa.autocorrelate(onsets - onsets.mean())
    correlation = np.maximum(correlation / (correlation[0] + 1e-9), 0.0)
    frames_per_minute = 60.0 * sample_rate / HOP
    low, high = (int(frames_per_minute / bpm) for bpm in (TEMPO_RANGE[1], TEMPO_RANGE[0]))
    high = min(high, len(correlation) - 2)
    if high <= low:
        return 120.0, 0.0
    lags = np.arange(low, high + 1)
    prior = np.exp(-0.5 * np.log2(frames_per_minute / lags / 120.0) ** 2)
    best = int(lags[np.argmax(correlation[lags] * prior)])
    a, b, c = correlation[best - 1], correlation[best], correlation[best + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) < 0 else 0.0
    return float(frames_per_minute / (best + shift)), float(np.clip(b, 0.0, 1.0))


def _beats(onsets: np.ndarray, sample_rate: int, bpm: float) -> np.ndarray:
    import librosa

    _, beats = librosa.beat.beat_track(
        onset_envelope=onsets, sr=sample_rate, hop_length=HOP, bpm=bpm, tightness=400, units="frames"
    )
    return beats


def _steadiness(onsets: np.ndarray, beats: np.ndarray) -> float:
    """How alike alternate beats of a grid are: near 1 on the beat (kick and snare both strong), low on a
    grid at twice the tempo, whose every other point falls between beats (hi-hats, or nothing)."""
    if len(beats) < 8:
        return 0.0
    strength = np.array([onsets[max(0, frame - 2) : frame + 3].max() for frame in beats])
    even, odd = strength[0::2].mean(), strength[1::2].mean()
    return float(min(even, odd) / (max(even, odd) + 1e-9))


def _tempo(onsets: np.ndarray, sample_rate: int) -> tuple[float, float, np.ndarray]:
    """BPM, confidence and beat frames.

    Autocorrelation cannot tell a tempo from its half when beats 1 and 3 sound alike (kick) and 2 and 4
    alike (snare), nor from its double under eighth-note hi-hats. Of the periodicity, its double and its
    half, the beat is the fastest grid whose every point carries a strong onset.
    """
    bpm, strength = _periodicity(onsets, sample_rate)
    candidates = [c for c in (bpm * 2, bpm, bpm / 2) if TEMPO_RANGE[0] * 0.9 <= c <= TEMPO_RANGE[1] * 1.1]
    tried = []
    for candidate in candidates:
        beats = _beats(onsets, sample_rate, candidate)
        steadiness = _steadiness(onsets, beats)
        if steadiness >= STEADY:
            return float(candidate), float(strength * steadiness), beats
        tried.append((steadiness, candidate, beats))
    steadiness, candidate, beats = max(tried, key=lambda found: found[0])
    return float(candidate), float(strength * steadiness), beats


def _metre(samples: np.ndarray, beats: np.ndarray, sample_rate: int) -> tuple[int | None, float]:
    """3 or 4 beats per bar: which grouping of beats makes one beat in each group stand out.

    A beat's accent is its low-frequency energy (downbeats carry the kick and the bass) plus its overall
    energy (an accented click), each relative to its mean over the beats.
    """
    import librosa

    if len(beats) < 12:
        return None, 0.0
    spectrum = np.abs(librosa.stft(samples, n_fft=1024, hop_length=HOP))
    accents = np.zeros(len(beats))
    for band in (spectrum[: int(200 * 1024 / sample_rate)], spectrum):  # below 200 Hz; everything
        energy = band.sum(axis=0)
        at_beats = np.array([energy[max(0, b - 2) : b + 3].max() if b < len(energy) else 0.0 for b in beats])
        accents += at_beats / (at_beats.mean() + 1e-9)
    contrast = {}
    for period in (2, 3, 4):
        usable = len(accents) // period * period
        groups = accents[:usable].reshape(-1, period)
        means = groups.mean(axis=0)
        contrast[period] = float(means.max() - np.delete(means, means.argmax()).mean())
    # Any 4/4 bar with a strong beat 1 and 3 also groups in twos: a metre of 2 is written as 4.
    three, four = contrast[3], max(contrast[4], contrast[2])
    beats_per_bar = 3 if three > four else 4
    confidence = abs(three - four) / (abs(three) + abs(four) + 1e-9)
    return beats_per_bar, float(np.clip(confidence, 0.0, 1.0))


def _key(samples: np.ndarray, sample_rate: int) -> tuple[str, float]:
    """The major or minor key whose profile best correlates with the clip's mean chroma."""
    import librosa

    chroma = librosa.feature.chroma_cqt(y=samples, sr=sample_rate, hop_length=HOP * 2)
    profile = chroma.mean(axis=1)
    scores = []
    for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            scores.append((np.corrcoef(profile, np.roll(template, tonic))[0, 1], f"{PITCHES[tonic]} {mode}"))
    scores.sort(reverse=True)
    (best, key), (second, _) = scores[0], scores[1]
    # Confidence: how far the best key stands above the runner-up (often its relative major or minor).
    confidence = float(np.clip((best - second) / max(1e-9, 1 - second), 0.0, 1.0))
    return key, confidence
