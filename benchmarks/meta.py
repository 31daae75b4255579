"""Tempo, key and metre accuracy of the `meta` task on generated material whose truth is known.

Cases: drum patterns (kick, snare, hi-hat) under chord progressions in a major or minor key, and bare
metronome clicks (accented downbeat), at tempos drawn from 60–180 BPM, in 3/4 and 4/4. Each is written as a
44.1 kHz stereo wav and read back through acecap's own audio loader, then analysed as `annotate --tasks
meta` does. Scoring: tempo within ±2 BPM (a half or double tempo counts as wrong), key exact (clicks have
no key and are left out), beats per bar exact.

    python benchmarks/meta.py                  # 60 cases of 30 s
    python benchmarks/meta.py --cases 6 -o /tmp/meta   # smoke run

Writes meta.json and meta.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

from acecap.audio import load_audio
from acecap.meta import PITCHES, analyse

RATE = 44100
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
    bpm: int
    beats: int  # per bar
    key: str | None  # "A minor"; None for clicks


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
    kick = np.sin(2 * np.pi * np.cumsum(np.linspace(120, 45, int(0.15 * RATE))) / RATE) * _hit(int(0.15 * RATE), 0.05)
    snare = rng.standard_normal(int(0.2 * RATE)) * _hit(int(0.2 * RATE), 0.06)
    hat = np.diff(rng.standard_normal(int(0.04 * RATE) + 1)) * _hit(int(0.04 * RATE), 0.008)
    click_high, click_low = (_tone(f, int(0.03 * RATE), 1) * _hit(int(0.03 * RATE), 0.008) for f in (1760, 880))

    def place(sound: np.ndarray, at_s: float, gain: float) -> None:
        start = int(at_s * RATE)
        out[start : start + len(sound)] += gain * sound[: len(out) - start]

    for index in range(n_beats):
        at, position = index * beat, index % case.beats
        if case.kind == "click":
            place(click_high if position == 0 else click_low, at, 0.6 if position == 0 else 0.35)
            continue
        if position == 0:
            place(kick, at, 1.0)
        elif case.beats == 4 and position == 2:
            place(kick, at, 0.8)
        if (case.beats == 4 and position in (1, 3)) or (case.beats == 3 and position in (1, 2)):
            place(snare, at, 1.0 if case.beats == 4 else 0.6)  # the backbeat; a waltz's "pah-pah" lighter
        for eighth in (0.0, 0.5):
            place(hat, at + eighth * beat, 0.12)
    if case.kind == "band":
        tonic_name, mode = case.key.split()
        tonic = PITCHES.index(tonic_name)
        progression = PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))]
        bar = beat * case.beats
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
    """`count` cases: a fifth clicks, the rest bands, keys cycling through all 24, metres alternating."""
    rng = np.random.default_rng(seed)
    found = []
    for index in range(count):
        bpm = int(rng.integers(60, 181))
        beats = 3 if index % 2 else 4
        if index % 5 == 4:
            found.append(Case(f"click{index:02d}", "click", bpm, beats, None))
            continue
        key = f"{PITCHES[(index * 7) % 12]} {'minor' if (index // 2) % 2 else 'major'}"
        found.append(Case(f"band{index:02d}", "band", bpm, beats, key))
    return found


def score(case: Case, found: dict) -> dict:
    bpm_ok = found["bpm"] is not None and abs(found["bpm"] - case.bpm) <= 2
    return {
        **asdict(case),
        "found_bpm": found["bpm"],
        "found_key": found["keyscale"],
        "found_beats": found["timesignature"],
        "bpm_ok": bpm_ok,
        "key_ok": None if case.key is None else found["keyscale"] == case.key,
        "beats_ok": found["timesignature"] == case.beats,
        "seconds": found["seconds"],
    }


def summarise(rows: list[dict]) -> dict:
    keyed = [r for r in rows if r["key_ok"] is not None]
    return {
        "cases": len(rows),
        "bpm_accuracy": sum(r["bpm_ok"] for r in rows) / len(rows),
        "key_cases": len(keyed),
        "key_accuracy": sum(r["key_ok"] for r in keyed) / len(keyed) if keyed else None,
        "beats_accuracy": sum(r["beats_ok"] for r in rows) / len(rows),
        "seconds_per_clip": sum(r["seconds"] for r in rows) / len(rows),
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    key = f"{s['key_accuracy']:.0%} of {s['key_cases']}" if s["key_accuracy"] is not None else "n/a"
    lines = [
        f"{s['cases']} clips of {report['setup']['seconds']:.0f} s ({report['setup']['machine']}):",
        "",
        "| measure | accuracy | target |",
        "| --- | --- | --- |",
        f"| tempo within ±2 BPM (half/double wrong) | {s['bpm_accuracy']:.0%} | ≥ 90 % |",
        f"| key exact | {key} | ≥ 80 % |",
        f"| beats per bar exact | {s['beats_accuracy']:.0%} | – |",
        "",
        f"Analysis time: {s['seconds_per_clip']:.2f} s per clip.",
        "",
        "| clip | truth | found |",
        "| --- | --- | --- |",
    ]
    for r in report["rows"]:
        truth = f"{r['bpm']} BPM, {r['beats']}/4, {r['key'] or 'no key'}"
        found = f"{r['found_bpm']} BPM, {r['found_beats']}/4, {r['found_key']}"
        wrong = [
            name for name, ok in (("tempo", r["bpm_ok"]), ("key", r["key_ok"]), ("metre", r["beats_ok"])) if ok is False
        ]
        lines.append(f"| {r['name']} | {truth} | {found}{' (wrong ' + ', '.join(wrong) + ')' if wrong else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import librosa

    rng = np.random.default_rng(args.seed + 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="acecap-meta-") as scratch:
        for case in cases(args.cases, args.seed):
            path = Path(scratch) / f"{case.name}.wav"
            mono = render(case, args.seconds, rng)
            soundfile.write(path, np.stack([mono, mono], axis=1), RATE)
            clip = load_audio(path)
            start = time.perf_counter()
            found = analyse(clip.samples).to_dict()
            found["seconds"] = time.perf_counter() - start
            rows.append(score(case, found))
    report = {
        "setup": {
            "machine": f"{platform.machine()}, {platform.platform()}",
            "librosa": librosa.__version__,
            "cases": args.cases,
            "seconds": args.seconds,
            "seed": args.seed,
        },
        "summary": summarise(rows),
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "meta.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "meta.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
