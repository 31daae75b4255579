"""Key from the signal: a tuned, harmonic chroma of the treble and of the bass, scored against key profiles.

- A constant-Q spectrum at a third of a semitone (C1 up, seven octaves) gives the tuning: the circular mean
  of spectral peaks' positions within a semitone (a recording at A = 432 Hz or a sped-up tape sits between
  the semitones), and the spectrum is read at the tuned semitone centres.
- A median over time keeps what sustains (chords, bass, melody) and drops what does not (drums, attacks),
  as in harmonic/percussive separation (FitzGerald 2010); magnitudes are log-compressed (Müller's CLP).
- The treble chroma and, at half weight, the bass chroma (where the tonic sits most) are correlated with
  the 24 rotations of Albrecht & Shanahan's major and minor corpus profiles, and so, at less weight, is the
  chroma of the last seconds: a song's final cadence usually lands on its tonic. A major key and its relative
  minor share their notes; the profiles tell them apart by the weight on the tonic triad and the minor's
  raised seventh, and the bass by which note is home.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE

PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
HOP = 512  # 32 ms at 16 kHz
FPS = SAMPLE_RATE / HOP
BINS_PER_SEMITONE = 3
OCTAVES = 7
FMIN = 32.703195662574764  # C1
BASS_SEMITONES = 24  # C1 to B2 (33–123 Hz): the bass line

# Albrecht & Shanahan (2013): pitch-class distributions of a corpus of major- and minor-key passages, tonic
# first. Of the profile families tried on the dev split (Krumhansl–Kessler, Temperley's Kostka–Payne,
# Temperley–de Clercq's rock corpus, their average) this one found the most keys; see docs/benchmarks.md.
MAJOR = (0.238, 0.006, 0.111, 0.006, 0.137, 0.094, 0.016, 0.214, 0.009, 0.080, 0.008, 0.081)
MINOR = (0.220, 0.006, 0.104, 0.123, 0.019, 0.103, 0.012, 0.214, 0.062, 0.022, 0.061, 0.052)
BASS_WEIGHT = 0.5  # the bass line's chroma counts half as much as the rest: it names the tonic, sparsely
ENDING_S, ENDING_WEIGHT = 3.0, 0.3  # the final cadence: most songs end on their tonic chord
KEYS = [f"{PITCHES[tonic]} {mode}" for mode in ("major", "minor") for tonic in range(12)]


@dataclass(frozen=True)
class Chroma:
    treble: np.ndarray  # (12, frames), pitch classes C…B, log-compressed
    bass: np.ndarray  # (12, frames)
    tuning: float  # semitones off A = 440 Hz, in [-0.5, 0.5)


def _templates() -> np.ndarray:
    """(24, 12): the profiles rotated to every tonic (KEYS' order), z-scored: a dot product is a correlation."""
    rows = np.array([np.roll(np.asarray(p, dtype=float), tonic) for p in (MAJOR, MINOR) for tonic in range(12)])
    return (rows - rows.mean(axis=1, keepdims=True)) / rows.std(axis=1, keepdims=True)


TEMPLATES = _templates()


def spectrum(samples: np.ndarray) -> np.ndarray:
    """Constant-Q magnitudes at a third of a semitone from C1, (252, frames)."""
    import librosa

    return np.abs(
        librosa.cqt(
            samples,
            sr=SAMPLE_RATE,
            hop_length=HOP,
            fmin=FMIN,
            n_bins=12 * BINS_PER_SEMITONE * OCTAVES,
            bins_per_octave=12 * BINS_PER_SEMITONE,
        )
    ).astype(np.float32)


def tuning(cqt: np.ndarray) -> float:
    """The deviation from A = 440 Hz in semitones: the magnitude-weighted circular mean of where spectral
    peaks fall within a semitone (each peak's position interpolated between bins)."""
    x = np.log1p(cqt / (cqt.max() + 1e-9) * 1000.0)
    a, b, c = x[:-2], x[1:-1], x[2:]
    peak = (b > a) & (b >= c) & (b > 0.3 * x.max(axis=0, keepdims=True))
    curvature = a - 2 * b + c
    offset = np.where(peak & (curvature < 0), 0.5 * (a - c) / np.where(curvature < 0, curvature, -1.0), 0.0)
    rows, _ = np.nonzero(peak)
    position = rows + 1 + np.clip(offset[peak], -0.5, 0.5)
    if position.size == 0:
        return 0.0
    angle = np.angle(np.sum(b[peak] * np.exp(2j * np.pi * position / BINS_PER_SEMITONE)))
    return float(angle / (2 * np.pi))  # the circle is one semitone


def chroma(samples: np.ndarray) -> Chroma:
    from scipy.ndimage import median_filter

    cqt = spectrum(samples)
    shift = tuning(cqt) * BINS_PER_SEMITONE  # bins
    bins = np.arange(0, cqt.shape[0], BINS_PER_SEMITONE) + shift  # the tuned semitone centres
    low = np.clip(np.floor(bins).astype(int), 0, cqt.shape[0] - 2)
    frac = np.clip(bins - low, 0.0, 1.0)[:, None]
    semitones = (1 - frac) * cqt[low] + frac * cqt[low + 1]  # (84, frames)
    sustained = median_filter(semitones, size=(1, 9), mode="nearest")  # ~0.3 s: drums and attacks drop out
    compressed = np.log1p(100.0 * sustained / (sustained.max() + 1e-9))
    folded = compressed.reshape(OCTAVES, 12, -1)
    return Chroma(
        treble=folded[BASS_SEMITONES // 12 :].sum(axis=0),
        bass=folded[: BASS_SEMITONES // 12].sum(axis=0),
        tuning=round(shift / BINS_PER_SEMITONE, 3),
    )


def correlations(profile: np.ndarray) -> np.ndarray:
    """(24,) each key's correlation with a 12-bin profile, in KEYS' order."""
    z = (profile - profile.mean()) / (profile.std() + 1e-9)
    return TEMPLATES @ z / 12.0


def ending(c: Chroma) -> np.ndarray:
    """The chroma of the last ENDING_S seconds before the music stops (trailing quiet and reverb left out)."""
    both = c.treble + c.bass
    loudness = both.sum(axis=0)
    playing = np.nonzero(loudness > 0.2 * loudness.max())[0]
    last = playing[-1] + 1 if len(playing) else both.shape[1]
    return both[:, max(0, last - int(ENDING_S * FPS)) : last].mean(axis=1)


def key(c: Chroma) -> tuple[str, float]:
    """The key whose profile best fits the treble and bass chroma and, less, the ending's (where a song's final
    cadence sits), and a confidence: the best key's margin over the runner-up (often its relative or its
    dominant), as a share of the best's own fit, scaled down where the chroma is nearly flat (FLAT_CHROMA)."""
    treble = c.treble.mean(axis=1)
    scores = correlations(treble) + BASS_WEIGHT * correlations(c.bass.mean(axis=1))
    scores = scores + ENDING_WEIGHT * correlations(ending(c))
    second, best = np.argsort(scores)[-2:]
    margin = (scores[best] - scores[second]) / (abs(scores[best]) + 1e-9)
    spread = treble.std() / (treble.mean() + 1e-12)  # near 0: every pitch class alike, as in noise
    tonal = float(np.clip((spread - FLAT_CHROMA[0]) / (FLAT_CHROMA[1] - FLAT_CHROMA[0]), 0.0, 1.0))
    return KEYS[int(best)], tonal * float(1.0 - np.exp(-max(0.0, margin) * KEY_CONFIDENCE_SCALE))  # never quite 1


KEY_CONFIDENCE_SCALE = 10.0
# The treble chroma's spread (std over mean) below the first has no key (its correlations are noise); above
# the second, a full one. On dev: noise up to 0.114 (keys at confidence up to 0.98 before), music from 0.143.
FLAT_CHROMA = (0.12, 0.18)


def changes(c: Chroma, beats: np.ndarray) -> np.ndarray:
    """How much the harmony changes at each beat (frames of this module's hop): one minus the cosine between
    the chroma of the beat that starts there and of the one before; the first beat gets the mean."""
    both = c.treble + c.bass
    edges = np.clip(np.asarray(beats, dtype=int), 0, both.shape[1] - 1)
    spans = [both[:, a:b].mean(axis=1) if b > a else both[:, a] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    spans = np.array(spans)
    unit = spans / (np.linalg.norm(spans, axis=1, keepdims=True) + 1e-9)
    change = 1.0 - np.sum(unit[1:] * unit[:-1], axis=1)
    return np.concatenate([[change.mean() if len(change) else 0.0], change])
