"""Tempo and time signature from the signal: onset envelopes, periodicity, beats, metrical level, metre.

The classic failures of onset-based tempo are octave errors: eighth-note hi-hats make the grid at twice the
tempo look as regular as the beat, and a kick on 1 and 3 makes the grid at half the tempo look as strong.
Following Goto (2001), the beat is decided from where the kick and the snare fall, not the hi-hats: a
percussive/harmonic split (FitzGerald 2010) of a log-mel spectrogram gives separate onset envelopes for
the low band (kick), the middle (snare, claps) and the top (hi-hats, cymbals), plus the bass line's onsets
for music without drums. The periodicity of their sum under a log-normal tempo prior (as librosa's) gives
a first period; of it and its relatives (×⅓, ×½, ×⅔, ×3/2, ×2, ×3) the beat is the level whose points all
carry the accents while the points between them do not, near the tempi people tap, and where the snare
alternates from beat to beat. These cues are weighed by a conditional logit over the candidate levels whose
weights were fitted on the dev split of `benchmarks/meta.py` (`benchmarks/meta_fit.py`), so a level's
confidence is its probability under that model. The tempo is then the slope of the tracked beats (drift
averages out), and the metre comes from how beats subdivide (2 or 3) and group (3 or 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .audio import SAMPLE_RATE

HOP = 256  # 16 ms at 16 kHz
FPS = SAMPLE_RATE / HOP
N_FFT = 1024
N_MELS = 48
LOW_HZ, HIGH_HZ = 160.0, 3000.0  # below: kick and bass; above: hi-hats and cymbals
TEMPO_RANGE = (40.0, 240.0)
PRIOR_BPM, PRIOR_OCTAVES = 100.0, 1.0  # a broad log-normal prior over felt tempi
RATIOS = (1 / 3, 1 / 2, 2 / 3, 1.0, 3 / 2, 2.0, 3.0)  # the metrical relatives of a first period
SUBDIVISIONS = (0.0, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4)  # where in a beat the accents are sampled
COMPOUND_THRESHOLD = 0.1  # log ratio of onsets at a beat's thirds to those at its halves: clearly more at thirds
VOICES = ("kick", "snare", "hats", "bass", "tonal")
LEVEL_FEATURES = (
    "prior",  # -(octaves from PRIOR_BPM)²: felt tempi cluster around it (Moelants 2002)
    "faster",  # octaves above PRIOR_BPM: lets the fit move the prior's centre
    "uniform",  # every beat carries an accent, not only every other one
    "uniform_triple",  # nor only every third one
    "between_half",  # the point halfway between beats carries less than the beats
    "between_third",  # and so do the points at a third and two thirds
    "periodic",  # the voices repeat at this period
    "backbeat",  # the snare alternates from beat to beat (Goto 2001)
    "hats_between",  # hi-hats subdivide the beat
    *(f"{voice}_{cue}" for voice in VOICES for cue in ("half", "third", "balance")),  # the same, voice by voice
)
# Beat support (beat_support) below the first has no pulse; above the second, a full one. Chosen on the dev split's
# music and beatless corpora (docs/benchmarks.md): 97 % of beatless clips fall under 0.3, 1.7 % of scores clips.
SUPPORTED = (0.6, 0.8)
# The spectrum's rise per frame (Envelopes.activity) below the first is a steady sound, whose scaled onsets are
# its numerical noise; above the second, enough to carry beats. On dev: music from 0.095, a steady tone or drone
# up to 0.011 (a sine held 30 s got 104 BPM at confidence 0.7 before).
STEADY = (0.02, 0.06)
# Fitted by benchmarks/meta_fit.py on the dev split (conditional logit, L2 0.1 by cross-validation; docs/benchmarks.md).
LEVEL_WEIGHTS = np.array([
    2.75, -1.15, 5.25, 1.64, 0.83, 3.56, 1.54, 5.82, -0.93,
    -0.01, 0.17, -0.22, -1.61, 0.31, -0.45, 0.65, -0.22, 1.51, 0.11, 0.1, -0.47, 0.12, 0.74, -1.06,
])  # fmt: skip


@dataclass
class Envelopes:
    """Onset strength per frame at FPS frames per second, each scaled to unit mean; and the spectrum."""

    bands: np.ndarray  # log-mel spectrum, N_MELS × frames
    full: np.ndarray  # every band, unseparated
    kick: np.ndarray  # percussive, below LOW_HZ
    snare: np.ndarray  # percussive, LOW_HZ to HIGH_HZ
    hats: np.ndarray  # above HIGH_HZ
    bass: np.ndarray  # harmonic, below LOW_HZ: the bass line's notes
    tonal: np.ndarray  # harmonic, above LOW_HZ: chords and melody
    activity: float  # the log-mel spectrum's mean rise per frame, unscaled: near 0 for a steady sound

    @cached_property  # read by every candidate level: computed once per clip
    def accent(self) -> np.ndarray:
        """What a beat carries: kick, snare, the bass line and chord or melody notes, not hi-hats; compressed,
        as loudness is, so that a beat with some accent counts nearly as much as one with a loud one."""
        return np.log1p((self.kick + self.snare + 0.5 * self.bass + self.tonal) / 4.0)

    @property
    def voices(self) -> np.ndarray:
        """The separated voices whose periodicity gives the first period."""
        return self.kick + self.snare + self.bass + 0.5 * self.tonal

    @cached_property
    def compressed(self) -> dict[str, np.ndarray]:
        """Each of VOICES, compressed as loudness is."""
        return {voice: np.log1p(getattr(self, voice)) for voice in VOICES}

    @cached_property
    def onsets(self) -> np.ndarray:
        """Everything that marks time, to follow beats with and to time them by."""
        return self.full + self.voices


@dataclass(frozen=True)
class Level:
    """One candidate beat period: its tracked beats and how well it explains the accents."""

    lag: float  # frames per beat
    beats: np.ndarray  # frames
    score: float


@dataclass(frozen=True)
class Rhythm:
    bpm: float | None
    bpm_confidence: float
    beats_per_bar: int | None  # 4, 3, or 6 for compound metre (6/8: bpm counts dotted quarters)
    metre_confidence: float
    beats: np.ndarray  # frames at FPS


def envelopes(samples: np.ndarray) -> Envelopes:
    import librosa
    from scipy.ndimage import median_filter

    spectrum = np.abs(librosa.stft(samples, n_fft=N_FFT, hop_length=HOP, center=True))
    mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=30.0, fmax=SAMPLE_RATE / 2)
    bands = np.log1p(100.0 * (mel @ spectrum) / (spectrum.max() + 1e-9))
    # FitzGerald's split: percussion is smooth across frequency, pitched sound across time.
    across_time = median_filter(bands, size=(1, 9), mode="nearest")
    across_bands = median_filter(bands, size=(7, 1), mode="nearest")
    percussive = bands * across_bands**2 / (across_bands**2 + across_time**2 + 1e-9)
    harmonic = bands - percussive
    centres = librosa.mel_frequencies(n_mels=N_MELS + 2, fmin=30.0, fmax=SAMPLE_RATE / 2)[1:-1]
    low, high = centres < LOW_HZ, centres >= HIGH_HZ
    middle = ~low & ~high

    def rise(x: np.ndarray, rows: np.ndarray) -> np.ndarray:  # per frame, summed over `rows`; 0 at the first
        return np.maximum(0.0, np.diff(x[rows], axis=1, prepend=x[rows][:, :1])).sum(axis=0)

    def flux(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        onsets = rise(x, rows)
        return onsets / (onsets.mean() + 1e-9)

    whole = rise(bands, np.ones(N_MELS, dtype=bool))
    return Envelopes(
        bands=bands,
        full=whole / (whole.mean() + 1e-9),
        kick=flux(percussive, low),
        snare=flux(percussive, middle),
        hats=flux(bands, high),
        bass=flux(harmonic, low),
        tonal=flux(harmonic, ~low),
        activity=float(whole[1:].mean()) if len(whole) > 1 else 0.0,  # the first frame's 0 is no rise
    )


def _detrended(envelope: np.ndarray) -> np.ndarray:
    """The envelope less its running mean over a second: periodicity, not loudness."""
    width = int(FPS)
    running = np.convolve(envelope, np.ones(width) / width, mode="same")
    return np.maximum(0.0, envelope - running)


def autocorrelation(envelope: np.ndarray) -> np.ndarray:
    x = _detrended(envelope)
    x = x - x.mean()
    n = len(x)
    spectrum = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[:n]
    acf /= np.arange(n, 0, -1)  # unbiased: long lags are averaged over fewer frames
    return acf / (acf[0] + 1e-9)


def _peak_lag(acf: np.ndarray, lag: float, spread: float = 0.06) -> float:
    """The ACF's highest point within ±spread of lag, interpolated between frames."""
    low, high = max(2, int(lag * (1 - spread))), min(len(acf) - 2, int(np.ceil(lag * (1 + spread))))
    if high < low:
        return lag
    best = low + int(np.argmax(acf[low : high + 1]))
    a, b, c = acf[best - 1], acf[best], acf[best + 1]
    curvature = a - 2 * b + c
    return best + (float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0)


def _bpm(lag: float) -> float:
    return 60.0 * FPS / lag


def first_period(acf: np.ndarray) -> float:
    """The lag (frames) of the strongest periodicity in the tempo range, under the prior."""
    lags = np.arange(int(_bpm(TEMPO_RANGE[1])), min(len(acf) - 1, int(_bpm(TEMPO_RANGE[0])) + 1))
    prior = np.exp(-0.5 * (np.log2(_bpm(lags) / PRIOR_BPM) / PRIOR_OCTAVES) ** 2)
    best = lags[int(np.argmax(np.maximum(acf[lags], 0) * prior))]
    return _peak_lag(acf, float(best), 0.02)


def track(envelope: np.ndarray, lag: float) -> np.ndarray:
    """Beat frames following `envelope` at about one beat per `lag` frames (dynamic programming, Ellis 2007)."""
    import librosa

    _, beats = librosa.beat.beat_track(
        onset_envelope=envelope, sr=SAMPLE_RATE, hop_length=HOP, bpm=_bpm(lag), tightness=300, trim=False
    )
    return np.asarray(beats, dtype=int)


def at_fractions(envelope: np.ndarray, beats: np.ndarray, fractions: tuple[float, ...]) -> np.ndarray:
    """The envelope's peak near each fraction of every inter-beat interval: shape (len(beats) - 1, fractions)."""
    starts, spans = beats[:-1], np.diff(beats)
    out = np.zeros((len(starts), len(fractions)))
    for column, fraction in enumerate(fractions):
        centre = np.round(starts + fraction * spans).astype(int)
        window = np.stack([np.clip(centre + d, 0, len(envelope) - 1) for d in (-1, 0, 1)])
        out[:, column] = envelope[window].max(axis=0)
    return out


def fitted_bpm(envelope: np.ndarray, beats: np.ndarray) -> float:
    """The tempo as the slope of beat times against beat numbers (least squares), with each beat moved to
    the interpolated onset peak within a frame; a steady drift averages out."""
    position = beats.astype(float)
    inside = (beats > 0) & (beats < len(envelope) - 1)
    a, b, c = envelope[beats[inside] - 1], envelope[beats[inside]], envelope[beats[inside] + 1]
    curvature = a - 2 * b + c
    shift = np.clip(0.5 * (a - c) / np.where(curvature < 0, curvature, -1.0), -0.5, 0.5)
    position[inside] += np.where(curvature < 0, shift, 0.0)
    slope = np.polyfit(np.arange(len(beats)), position, 1)[0]
    return _bpm(slope)


def _share(smaller: float, larger: float) -> float:
    return min(1.0, smaller / (larger + 1e-9))


def level_features(e: Envelopes, lag: float, periodicity: float, beats: np.ndarray) -> np.ndarray:
    """The cues of LEVEL_FEATURES for beats tracked at `lag` frames: at twice the tempo the off-beats carry only
    hi-hats (uniform); at half the tempo the snare falls between beats (between, backbeat); at a third, the
    waltz's second and third beats do (between_third)."""
    profile = at_fractions(e.accent, beats, SUBDIVISIONS)
    on = profile[:, 0]
    pairs = on[0::2].mean(), on[1::2].mean()
    triples = on[: len(on) // 3 * 3].reshape(-1, 3).mean(axis=0)
    means = profile.mean(axis=0)
    snare = at_fractions(e.snare, beats, (0.0,))[:, 0]
    backbeat = abs(snare[0::2].mean() - snare[1::2].mean()) / (snare[0::2].mean() + snare[1::2].mean() + 1e-9)
    hats = at_fractions(e.hats, beats, SUBDIVISIONS).mean(axis=0)
    octaves = np.log2(_bpm(lag) / PRIOR_BPM)
    features = [
        -(octaves**2),
        octaves,
        np.log(_share(min(pairs), max(pairs)) + 0.05),
        np.log(_share(triples.min(), triples.max()) + 0.05),
        np.log(1.0 - _share(means[3], means[0]) + 0.05),
        np.log(1.0 - _share(max(means[2], means[4]), means[0]) + 0.05),
        periodicity,
        backbeat,
        np.log(_share(max(hats[2], hats[3], hats[4]), hats[0]) + 0.05),
    ]
    for voice in VOICES:
        voice_profile = at_fractions(e.compressed[voice], beats, SUBDIVISIONS)
        m = voice_profile.mean(axis=0) + 1e-3
        even, odd = voice_profile[0::2, 0].mean() + 1e-3, voice_profile[1::2, 0].mean() + 1e-3
        features += [np.log(m[3] / m[0]), np.log(max(m[2], m[4]) / m[0]), -abs(np.log(even / odd))]
    return np.array(features)


def candidates(e: Envelopes) -> list[tuple[float, float, np.ndarray]]:
    """(lag, periodicity, tracked beats) for a first period and its metrical relatives in the tempo range."""
    acf = autocorrelation(e.voices)
    parts = [autocorrelation(x) for x in (e.kick + e.snare, e.bass, e.tonal)]
    first = first_period(acf)
    found = []
    for ratio in RATIOS:
        lag = first / ratio
        if not _bpm(TEMPO_RANGE[1]) <= lag <= _bpm(TEMPO_RANGE[0]) or lag >= len(acf) - 2:
            continue
        lag = _peak_lag(acf, lag, 0.04)
        beats = track(e.onsets, lag)
        if len(beats) >= 8:
            found.append((lag, float(np.mean([part[int(round(lag))] for part in parts])), beats))
    return found


def beat_level(e: Envelopes) -> tuple[Level | None, float]:
    """The most likely beat level and its probability among the candidates."""
    levels = [
        Level(lag, beats, float(level_features(e, lag, p, beats) @ LEVEL_WEIGHTS)) for lag, p, beats in candidates(e)
    ]
    if not levels:
        return None, 0.0
    scores = np.array([level.score for level in levels])
    likelihood = np.exp(scores - scores.max())
    return levels[int(np.argmax(scores))], float(1.0 / likelihood.sum())


def _contrast(values: np.ndarray, group: int) -> float:
    """How much one position in groups of `group` beats stands out, in standard deviations."""
    usable = len(values) // group * group
    if usable < 2 * group:
        return 0.0
    means = values[:usable].reshape(-1, group).mean(axis=0)
    return float((means.max() - np.delete(means, means.argmax()).mean()) / (values.std() + 1e-9))


def bar_similarity(e: Envelopes, beats: np.ndarray) -> dict[int, float]:
    """How alike the spectra at beats `n` apart are (mean cosine, for n = 2, 3, 4): bars repeat, so beats one
    bar apart sound alike (a beat similarity matrix, after Gainza 2009). The spectrum is taken over each
    beat's first quarter, where the beat's own sounds are."""
    spans = np.diff(beats)
    frames = [
        e.bands[:, start : start + max(1, int(round(0.25 * span)))].mean(axis=1)
        for start, span in zip(beats[:-1], spans, strict=True)
    ]
    spectra = np.stack(frames)
    spectra = spectra - spectra.mean(axis=0)
    spectra /= np.linalg.norm(spectra, axis=1, keepdims=True) + 1e-9
    return {n: float(np.mean(np.sum(spectra[:-n] * spectra[n:], axis=1))) for n in (2, 3, 4)}


def metre(e: Envelopes, beats: np.ndarray, harmony: np.ndarray | None = None) -> tuple[int, float]:
    """Beats per bar as ACE-Step writes it (4, 3, or 6 for compound metre) and a confidence.

    Compound when beats divide in three (notes at a third and two thirds of the beat, not at its half; a
    swing's long–short has only the two-thirds); otherwise 3 or 4 by the grouping in which one beat stands
    out (in the kick and bass, in loudness, and in the harmony's changes: `harmony`, change per beat) and
    at which beats sound alike (bar_similarity).
    """
    thirds = []
    for envelope in (e.hats, e.tonal):  # the subdividing voices: cymbals, chords and melody
        means = at_fractions(envelope, beats, SUBDIVISIONS).mean(axis=0)
        third, half = min(means[2], means[4]), max(means[1], means[3], means[5])
        thirds.append(np.log((third / means[0] + 0.05) / (half / means[0] + 0.05)))
    ternary = float(np.mean(thirds)) - COMPOUND_THRESHOLD
    if ternary > 0:
        return 6, float(1.0 - np.exp(-ternary / 0.3))
    low = np.log1p(at_fractions(e.kick + e.bass, beats, (0.0,))[:, 0])  # downbeats carry the kick and bass
    loud = np.log1p(at_fractions(e.full, beats, (0.0,))[:, 0])  # and are played harder
    evidence = [low, loud] + ([harmony] if harmony is not None else [])
    triple = np.mean([_contrast(x, 3) for x in evidence])
    duple = np.mean([max(_contrast(x, 2), _contrast(x, 4)) for x in evidence])
    alike = bar_similarity(e, beats)
    by_sound = alike[3] - max(alike[2], alike[4])
    vote = triple - duple + by_sound
    confidence = (1.0 - np.exp(ternary / 0.3)) * abs(vote) / (abs(triple) + abs(duple) + abs(by_sound) + 1e-9)
    return (3 if vote > 0 else 4), float(min(1.0, confidence))


def beat_support(e: Envelopes, beats: np.ndarray) -> float:
    """The share of tracked beats that land on an onset (a peak above twice the envelope's median): near 1 in
    music with a pulse; 0.5 or so where the tracker only guessed them (noise, a drone, chords held for seconds)."""
    on = at_fractions(e.onsets, beats, (0.0,))[:, 0]
    return float(np.mean(on > 2.0 * np.median(e.onsets))) if len(on) else 0.0


def analyse(samples: np.ndarray, harmony: Callable[[np.ndarray], np.ndarray] | None = None) -> Rhythm:
    """Tempo (felt beats per minute), metre and beats of mono 16 kHz samples. Their confidences are scaled
    down where the beats have little to stand on (beat_support) or the sound hardly changes (STEADY), so audio
    without a pulse gets no tempo."""
    e = envelopes(samples)
    level, confidence = beat_level(e)
    if level is None:
        return Rhythm(None, 0.0, None, 0.0, np.zeros(0, dtype=int))
    bpm = fitted_bpm(e.onsets, level.beats)
    beats_per_bar, metre_confidence = metre(e, level.beats, harmony(level.beats) if harmony else None)
    low, high = SUPPORTED
    pulse = float(np.clip((beat_support(e, level.beats) - low) / (high - low), 0.0, 1.0))
    pulse = min(pulse, float(np.clip((e.activity - STEADY[0]) / (STEADY[1] - STEADY[0]), 0.0, 1.0)))
    return Rhythm(bpm, confidence * pulse, beats_per_bar, metre_confidence * pulse, level.beats)
