"""A corpus synthesised sample by sample with numpy: drum sounds, chord tones and clicks, no instruments.

Four in five cases are a band: a kick on the downbeat (and on beat 3 in 4/4), a snare on the backbeat,
hi-hats on every eighth or sixteenth, and a bass and chord progression changing every bar (I–V–vi–IV or
I–IV–V–I in major, i–iv–V–i or i–VI–iv–V in minor); one in five a bare metronome with an accented downbeat
(no key). Metres are 4/4, 3/4 and 6/8 (kick on 1, snare on 4, hi-hats on every eighth; the tempo counts
dotted quarters). This was the material the first estimator was built on; it stays as one corpus of several.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATE = 44100
PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Scale degrees (semitones above the tonic) of each chord's root and its quality.
PROGRESSIONS = {
    "major": [[(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")], [(0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")]],
    "minor": [[(0, "min"), (5, "min"), (7, "maj"), (0, "min")], [(0, "min"), (8, "maj"), (5, "min"), (7, "maj")]],
}
TRIADS = {"maj": (0, 4, 7), "min": (0, 3, 7)}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "band" (drums and chords) or "click"
    bpm: int  # felt beats per minute (dotted quarters in 6/8)
    timesignature: int  # 4, 3 or 6 (6/8)
    key: str | None  # "A minor"; None for clicks
    hats: int = 8  # hi-hat subdivision: 8 (eighths) or 16 (sixteenths)


def _hit(length: int, decay_s: float) -> np.ndarray:
    return np.exp(-np.arange(length) / (decay_s * RATE))


def _tone(frequency: float, length: int, partials: int = 4) -> np.ndarray:
    t = np.arange(length) / RATE
    return sum(np.sin(2 * np.pi * frequency * k * t) / k for k in range(1, partials + 1))


def render(case: Case, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono samples at 44.1 kHz of one case."""
    total = int(seconds * RATE)
    out = np.zeros(total + RATE)
    beat = 60.0 / case.bpm
    n_beats = int(seconds / beat)
    compound = case.timesignature == 6
    beats_per_bar = 2 if compound else case.timesignature
    kick = np.sin(2 * np.pi * np.cumsum(np.linspace(120, 45, int(0.15 * RATE))) / RATE) * _hit(int(0.15 * RATE), 0.05)
    snare = rng.standard_normal(int(0.2 * RATE)) * _hit(int(0.2 * RATE), 0.06)
    hat = np.diff(rng.standard_normal(int(0.04 * RATE) + 1)) * _hit(int(0.04 * RATE), 0.008)
    click_high, click_low = (_tone(f, int(0.03 * RATE), 1) * _hit(int(0.03 * RATE), 0.008) for f in (1760, 880))

    def place(sound: np.ndarray, at_s: float, gain: float) -> None:
        start = int(at_s * RATE)
        out[start : start + len(sound)] += gain * sound[: len(out) - start]

    hat_steps = 3 if compound else case.hats // 4
    for index in range(n_beats):
        at, position = index * beat, index % beats_per_bar
        if case.kind == "click":
            place(click_high if position == 0 else click_low, at, 0.6 if position == 0 else 0.35)
            for step in range(1, 3 if compound else 1):  # 6/8 clicks every eighth
                place(click_low, at + step / 3 * beat, 0.2)
            continue
        if position == 0:
            place(kick, at, 1.0)
        elif case.timesignature == 4 and position == 2:
            place(kick, at, 0.8)
        if case.timesignature == 4 and position in (1, 3) or compound and position == 1:
            place(snare, at, 1.0)
        elif case.timesignature == 3 and position in (1, 2):
            place(snare, at, 0.6)  # a waltz's "pah-pah", lighter
        for step in range(hat_steps):
            place(hat, at + step / hat_steps * beat, 0.12 if step == 0 else 0.09)
    if case.kind == "band":
        tonic_name, mode = case.key.split()
        tonic = PITCHES.index(tonic_name)
        progression = PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))]
        bar = beat * beats_per_bar
        for index in range(int(seconds / bar)):
            root, quality = progression[index % len(progression)]
            length = int(bar * RATE)
            bass = 110.0 * 2 ** (((tonic + root) % 12 - 9) / 12)  # C2 … B2 (A2 = 110 Hz)
            chord = sum(_tone(bass * 4 * 2 ** (step / 12), length) for step in TRIADS[quality])
            envelope = np.minimum(1.0, np.arange(length) / (0.01 * RATE)) * _hit(length, bar * 1.5)
            place((0.3 * _tone(bass, length, 2) + 0.25 * chord) * envelope, index * bar, 0.5)
    out = out[:total]
    return (0.8 * out / np.abs(out).max()).astype(np.float32)


def cases(count: int, seed: int) -> list[Case]:
    """`count` cases: a fifth clicks, the rest bands; keys, metres, tempi and hi-hats drawn from `seed`."""
    rng = np.random.default_rng(seed)
    found = []
    for index in range(count):
        metre = int(rng.choice([4, 4, 3, 6]))
        bpm = int(rng.integers(46, 85)) if metre == 6 else int(rng.integers(60, 181))
        hats = int(rng.choice([8, 16]))
        if index % 5 == 4:
            found.append(Case(f"click{seed + index}", "click", bpm, metre, None, hats))
            continue
        key = f"{PITCHES[int(rng.integers(12))]} {rng.choice(['major', 'minor'])}"
        found.append(Case(f"band{seed + index}", "band", bpm, metre, key, hats))
    return found
