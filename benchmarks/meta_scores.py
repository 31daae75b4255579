"""A corpus of pieces composed as symbolic scores and rendered with a General MIDI soundfont.

Each seed composes one piece: a key (all 24), a metre (4/4, 3/4 or 6/8), a tempo, a groove from a drummer's
vocabulary (rock backbeat with eighth or sixteenth hi-hats, four-on-the-floor, syncopated funk, shuffle,
waltz, 6/8 ballad, or no drums at all), sections built from common progressions (some of them loops whose
notes fit the relative key equally well, like vi–IV–I–V), a bass line, a comping part, a melody whose
phrases come home to the tonic, now and then a modulation to a related key and back, a slow tempo drift,
human timing and velocity, and a detuned master for some. The score is written as a MIDI file (mido) and
rendered by fluidsynth with FluidR3 GM (Debian: `apt-get install fluidsynth fluid-soundfont-gm`).

Truth: the tempo is the felt beat (the dotted quarter in 6/8), averaged over the drift and scaled by the
detuning; the key is the home key (where the piece starts and, unless cut, ends; at least three quarters of
its bars); the time signature is 4 (4/4), 3 (3/4) or 6 (6/8), as ACE-Step writes them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

RATE = 44100
PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2")

# Chords as (semitones above the tonic, quality); progressions one chord per bar.
MAJOR = {"I": (0, "maj"), "ii": (2, "min"), "iii": (4, "min"), "IV": (5, "maj"), "V": (7, "maj"),
         "V7": (7, "dom7"), "vi": (9, "min"), "Imaj7": (0, "maj7")}  # fmt: skip
MINOR = {"i": (0, "min"), "iv": (5, "min"), "v": (7, "min"), "V": (7, "maj"), "V7": (7, "dom7"),
         "VI": (8, "maj"), "III": (3, "maj"), "VII": (10, "maj"), "iio": (2, "dim")}  # fmt: skip
# Verses establish the key; choruses may loop on chords the relative key shares.
VERSES = {
    "major": ["I V vi IV", "I IV V I", "I vi IV V", "I IV I V7", "I iii IV V", "Imaj7 IV ii V7"],
    "minor": ["i iv V7 i", "i VI iv V", "i VII VI V", "i iv v i", "i VI III VII", "i iio V7 i"],
}
CHORUSES = {
    "major": ["vi IV I V", "IV I V vi", "I V vi IV", "IV V I I", "ii IV I V"],
    "minor": ["VI VII i i", "III VII i VI", "i VI III VII", "VI III VII i", "iv VI V i"],
}
QUALITIES = {"maj": (0, 4, 7), "min": (0, 3, 7), "dim": (0, 3, 6), "dom7": (0, 4, 7, 10), "maj7": (0, 4, 7, 11)}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}

# Drum grooves: steps per beat, beats per bar, and per drum a bar of steps ('x' hit, 'o' soft, '.' rest).
KICK, SNARE, CLAP, HAT, OPEN_HAT, PEDAL_HAT, RIDE, CRASH, STICK, TOM = 36, 38, 39, 42, 46, 44, 51, 49, 37, 45
GROOVES = {
    "rock8": (4, 4, {KICK: "x.......x.......", SNARE: "....x.......x...", HAT: "x.x.x.x.x.x.x.x."}),
    "rock8-push": (4, 4, {KICK: "x.......x.x.....", SNARE: "....x.......x...", HAT: "x.x.x.x.x.x.x.x."}),
    "pop16": (4, 4, {KICK: "x......x..x.....", SNARE: "....x.......x...", HAT: "xoxoxoxoxoxoxoxo"}),
    "four-floor": (
        4,
        4,
        {KICK: "x...x...x...x...", CLAP: "....x.......x...", HAT: "xoxoxoxoxoxoxoxo", OPEN_HAT: "..x...x...x...x."},
    ),  # fmt: skip
    "funk": (4, 4, {KICK: "x..x..x...x..x..", SNARE: "....x..o.o..x..o", HAT: "xoxoxoxoxoxoxoxo"}),
    "shuffle": (3, 4, {KICK: "x.....x.....", SNARE: "...x.....x..", HAT: "x.xx.xx.xx.x"}),
    "ride-jazz": (3, 4, {KICK: "x.....o.....", STICK: "...x.....x..", RIDE: "x.xx.xx.xx.x", PEDAL_HAT: "...x.....x.."}),
    "waltz": (2, 3, {KICK: "x.....", SNARE: "..o.o.", HAT: "x.x.x."}),
    "waltz-rock": (2, 3, {KICK: "x...x.", SNARE: "..x...", HAT: "xxxxxx"}),
    "six-eight": (3, 2, {KICK: "x.....", SNARE: "...x..", HAT: "xxxxxx"}),
    "six-eight-rock": (3, 2, {KICK: "x..x..", SNARE: "...x..", HAT: "xoxxox"}),
}
STYLES = {  # metre → grooves to draw from ("none": no drums)
    4: ["rock8", "rock8", "rock8-push", "pop16", "four-floor", "funk", "shuffle", "ride-jazz", "none"],
    3: ["waltz", "waltz-rock", "none"],
    6: ["six-eight", "six-eight-rock", "none"],
}
TEMPI = {4: (68, 168), 3: (84, 180), 6: (46, 84)}  # felt beats per minute (dotted quarters in 6/8)
PROGRAMS = {
    "chords": [0, 1, 4, 5, 16, 24, 25, 26, 48, 49, 61, 88, 89],
    "bass": [32, 33, 34, 35, 38, 39, 43],
    "melody": [0, 11, 40, 56, 64, 65, 68, 71, 73, 80, 81, 85],
}


@dataclass(frozen=True)
class Piece:
    """One composed piece and its truth."""

    name: str
    seed: int
    bpm: float  # felt beats per minute, after drift (mean) and detuning
    timesignature: int  # 4, 3 or 6
    key: str  # "F# minor"
    groove: str
    detail: str  # what else makes it hard: swing, drift, modulation, detuning, cut


@dataclass
class Note:
    channel: int
    pitch: int
    start: float  # in beats
    length: float
    velocity: int


def fluidsynth_available() -> str | None:
    """Why the corpus cannot be rendered here, or None when it can."""
    if shutil.which("fluidsynth") is None:
        return "fluidsynth is not installed (apt-get install fluidsynth fluid-soundfont-gm)"
    if not any(Path(p).is_file() for p in SOUNDFONTS):
        return "no General MIDI soundfont (apt-get install fluid-soundfont-gm)"
    return None


def _spec(seed: int, **fixed) -> dict:
    """The random choices that define one piece; `fixed` overrides any of them."""
    rng = np.random.default_rng(seed)
    spec = {"tonic": int(rng.integers(12)), "mode": str(rng.choice(["major", "minor"]))}
    spec["metre"] = int(rng.choice([4, 4, 4, 3, 6]))
    spec.update({k: v for k, v in fixed.items() if k in ("tonic", "mode", "metre")})
    low, high = TEMPI[spec["metre"]]
    spec["bpm"] = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    spec["groove"] = str(rng.choice(STYLES[spec["metre"]]))
    spec["swing"] = 0.0 if spec["metre"] == 6 else float(rng.choice([0.0, 0.0, 0.0, 0.08]))  # straight grooves
    spec["drift"] = float(rng.choice([0.0, rng.uniform(0.005, 0.02)]))  # peak deviation of a slow tempo wave
    spec["detune_cents"] = float(rng.choice([0.0, 0.0, rng.uniform(-45, 45)]))
    spec["modulate"] = bool(rng.random() < 0.3)
    spec["cut"] = bool(rng.random() < 0.4)  # the clip ends mid-phrase, not on the final tonic
    spec["parts"] = str(rng.choice(["full", "full", "full", "no-melody"]))
    spec["humanise_ms"] = float(rng.uniform(2, 12))
    spec["programs"] = {part: int(rng.choice(options)) for part, options in PROGRAMS.items()}
    spec["sections"] = [str(rng.choice(VERSES[spec["mode"]])), str(rng.choice(CHORUSES[spec["mode"]]))]
    spec["comping"] = int(rng.integers(4))
    spec["harmonic_rhythm"] = float(rng.choice([1, 1, 1, 2, 0.5]))  # chords per bar
    spec["start_chord"] = int(rng.choice([0, 0, 1, 2, 3]))  # where in its progression the clip begins
    if spec["groove"] == "none":  # without drums the accompaniment marks the beat, as a pianist or guitarist would
        spec["comping"] = int(rng.choice({4: [1, 2], 3: [0, 1, 2], 6: [0, 2]}[spec["metre"]]))
    spec.update(fixed)
    return spec


def _chord_pitches(root_pc: int, quality: str, previous: list[int] | None) -> list[int]:
    """A voicing between G3 and E5 that moves least from the previous one."""
    intervals = QUALITIES[quality]
    options = []
    for inversion in range(len(intervals)):
        notes = sorted((root_pc + i) % 12 + 12 * (4 + (k < inversion)) for k, i in enumerate(intervals))
        for shift in (-12, 0, 12):
            voiced = [n + shift for n in notes]
            if 55 <= voiced[0] and voiced[-1] <= 76:
                options.append(voiced)
    if not options:
        return [root_pc + 60 + i for i in intervals]
    if previous is None:
        return min(options, key=lambda v: abs(v[0] - 60))
    return min(options, key=lambda v: sum(abs(a - b) for a, b in zip(v, previous, strict=False)))


def compose(spec: dict, bars: int) -> tuple[list[Note], dict]:
    """Notes of the whole piece (beats as time unit) and its truth."""
    rng = np.random.default_rng(spec.get("seed", 0) + 7)
    metre, mode, tonic = spec["metre"], spec["mode"], spec["tonic"]
    beats_per_bar = 2 if metre == 6 else metre
    sub = 3 if metre == 6 else 2  # eighths per beat
    table = MAJOR if mode == "major" else MINOR
    notes: list[Note] = []
    # Harmony: verse, chorus, verse… of four chords each, one chord a bar, two, or one every two bars; the
    # clip may begin anywhere in the progression; one section may move to a related key and come back.
    per_bar = spec["harmonic_rhythm"]
    halves = {4: (2, 2), 3: (2, 1), 2: (1, 1)}[beats_per_bar]
    segments = []  # (start beat, beats, chord index)
    for bar in range(bars):
        if per_bar == 2:
            segments += [
                (bar * beats_per_bar, halves[0], 2 * bar),
                (bar * beats_per_bar + halves[0], halves[1], 2 * bar + 1),
            ]
        else:
            segments.append((bar * beats_per_bar, beats_per_bar, bar if per_bar == 1 else bar // 2))
    chords_total = segments[-1][2] + 1
    modulated = None
    if spec["modulate"] and chords_total >= 12:
        modulated = int(rng.integers(1, chords_total // 4 - 1)) * 4
    plan = []  # per segment: (start, beats, key tonic, mode, chord symbol, phrase end)
    for index, (start, length, chord) in enumerate(segments):
        step = chord + spec["start_chord"]
        symbols = spec["sections"][(step // 4) % 2].split()
        key_tonic, key_mode = tonic, mode
        if modulated is not None and modulated <= chord < modulated + 4:
            shift, key_mode = [(7, mode), (5, mode), (3 if mode == "minor" else 9, _other(mode)), (2, mode)][
                spec["seed"] % 4
            ]
            key_tonic = (tonic + shift) % 12
            symbols = VERSES[key_mode][0].split()
        last_of_chord = index == len(segments) - 1 or segments[index + 1][2] != chord
        plan.append((start, length, key_tonic, key_mode, symbols[step % 4], step % 4 == 3 and last_of_chord))
    if not spec["cut"]:  # a full ending: V then I in the home key
        plan[-2] = (*plan[-2][:2], tonic, mode, "V7", False)
        plan[-1] = (*plan[-1][:2], tonic, mode, "I" if mode == "major" else "i", True)
    home_beats = sum(length for _, length, t, m, _, _ in plan if (t, m) == (tonic, mode))
    programs = spec["programs"]
    previous = None
    melody_pitch = 67 + tonic % 12 - (12 if tonic % 12 > 5 else 0)
    for start, length, key_tonic, key_mode, symbol, phrase_end in plan:
        chords = MAJOR if key_mode == "major" else MINOR
        degree, quality = chords.get(symbol, table.get(symbol, (0, "maj")))
        root = (key_tonic + degree) % 12
        voicing = _chord_pitches(root, quality, previous)
        previous = voicing
        part = []
        if spec["parts"] != "melody-only":
            part += _comping(voicing, start, length, sub, spec["comping"], metre, rng)
            part += _bass(root, start, length, sub, spec["groove"], metre, rng)
        if spec["parts"] != "no-melody":
            scale = [(key_tonic + s) % 12 for s in SCALES[key_mode]]
            if key_mode == "minor" and symbol in ("V", "V7"):
                scale[6] = (key_tonic + 11) % 12  # the raised seventh over the dominant
            tones = [(root + i) % 12 for i in QUALITIES[quality]]
            home = key_tonic if phrase_end and degree == 0 else None
            melody, melody_pitch = _melody(scale, tones, home, melody_pitch, start, length, sub, rng)
            part += melody
        notes += [n for n in part if n.start < start + length - 1e-6]  # patterns written for a bar, cut to the chord
    notes += _drums(spec["groove"], bars, beats_per_bar, rng)
    for note in notes:
        note.velocity = int(np.clip(note.velocity + rng.integers(-8, 9), 20, 127))
    truth = {"home_share": home_beats / (bars * beats_per_bar), "programs": programs}
    return notes, truth


def _other(mode: str) -> str:
    return "minor" if mode == "major" else "major"


def _comping(voicing: list[int], start: float, beats: int, sub: int, style: int, metre: int, rng) -> list[Note]:
    ch = 0
    if metre == 3 and style % 2 == 0:  # oom-pah-pah: chords on 2 and 3
        return [Note(ch, p, start + b, 0.8, 62) for b in (1, 2) for p in voicing]
    if metre == 6:  # arpeggiated eighths or a held chord
        if style % 2 == 0:
            order = [voicing[0], voicing[-1], voicing[1 % len(voicing)]] * 2
            return [Note(ch, p, start + i / 3, 0.4, 58 + 8 * (i % 3 == 0)) for i, p in enumerate(order)]
        return [Note(ch, p, start, beats - 0.05, 55) for p in voicing]
    if style == 0:  # a held chord
        return [Note(ch, p, start, beats - 0.05, 52) for p in voicing]
    if style == 1:  # quarter-note stabs
        return [Note(ch, p, start + b, 0.45, 60 + 10 * (b == 0)) for b in range(beats) for p in voicing]
    if style == 2:  # eighth-note arpeggio
        order = (voicing + voicing[-2:0:-1]) * 4
        return [Note(ch, order[i], start + i / sub, 0.45, 56 + 10 * (i % sub == 0)) for i in range(beats * sub)]
    return [Note(ch, p, start + b + 0.5, 0.35, 60) for b in range(beats) for p in voicing]  # off-beat skank


def _bass(root: int, start: float, beats: int, sub: int, groove: str, metre: int, rng) -> list[Note]:
    low = 28 + (root - 4) % 12  # E1 … D#2
    ch = 1
    if metre == 6:
        return [
            Note(ch, low, start, 1.3, 100),
            Note(ch, low + 7, start + 1, 0.6, 85),
            Note(ch, low, start + 5 / 3, 0.3, 80),
        ]
    if metre == 3:
        return [Note(ch, low, start, 0.9, 100)] + (
            [Note(ch, low + 7, start + 2, 0.9, 80)] if rng.random() < 0.3 else []
        )
    if groove in ("rock8", "rock8-push") and rng.random() < 0.5:  # driving eighths
        return [Note(ch, low, start + i / 2, 0.4, 95 if i % 2 == 0 else 78) for i in range(beats * 2)]
    if groove == "funk":
        return [Note(ch, low + o, start + t, 0.2, v) for t, o, v in ((0, 0, 105), (0.75, 12, 80), (1.5, 0, 90),
                                                                     (2.5, 7, 88), (3.25, 12, 75))]  # fmt: skip
    if groove in ("shuffle", "ride-jazz"):  # walking quarters
        steps = [0, 4, 7, 9] if rng.random() < 0.5 else [0, 2, 4, 5]
        return [Note(ch, low + s, start + b, 0.9, 90) for b, s in enumerate(steps[:beats])]
    return [Note(ch, low, start, 1.4, 100), Note(ch, low + 7, start + 2, 0.9, 88), Note(ch, low, start + 3.5, 0.4, 80)]


def _melody(scale, tones, home, pitch, start, beats, sub, rng) -> tuple[list[Note], int]:
    """A phrase of chord tones on strong beats and scale steps between; the phrase's end goes home."""
    ch = 2
    out = []
    positions = sorted(set([0] + [i / sub for i in range(1, beats * sub) if rng.random() < 0.45]))
    for index, at in enumerate(positions):
        strong = at == int(at)
        last = index == len(positions) - 1
        if last and home is not None:
            choices = [p for p in range(pitch - 7, pitch + 8) if p % 12 == home]
        elif strong:
            choices = [p for p in range(pitch - 5, pitch + 6) if p % 12 in tones]
        else:
            choices = [p for p in range(pitch - 3, pitch + 4) if p % 12 in scale and p != pitch]
        choices = [p for p in choices if 60 <= p <= 84] or [pitch]
        pitch = int(rng.choice(choices))
        end = positions[index + 1] if not last else beats
        out.append(Note(ch, pitch, start + at, max(0.2, (end - at) * 0.9), 80 + 12 * strong))
    return out, pitch


def _drums(groove: str, bars: int, beats: int, rng) -> list[Note]:
    if groove == "none":
        return []
    steps, _, pattern = GROOVES[groove]
    out = []
    for bar in range(bars):
        for drum, hits in pattern.items():
            for step, mark in enumerate(hits):
                if mark == ".":
                    continue
                velocity = (112 if drum in (KICK, SNARE, CLAP) else 80) if mark == "x" else 42
                if drum in (HAT, RIDE) and step % steps == 0:
                    velocity += 10
                out.append(Note(9, drum, bar * beats + step / steps, 0.1, velocity))
        if bar % 4 == 3 and rng.random() < 0.6:  # a fill into the next phrase
            out += [Note(9, TOM + 2 * (i % 3), bar * beats + beats - 1 + i / steps, 0.1, 95) for i in range(steps)]
        if bar % 8 == 0:
            out.append(Note(9, CRASH, bar * beats, 0.5, 100))
    return out


def _swung(at: float, swing: float) -> float:
    """Delay each off-beat eighth by `swing` of a beat (0.08: a light swing; a shuffle is written as triplets)."""
    beat, frac = divmod(at, 1.0)
    return beat + (frac + swing if abs(frac - 0.5) < 1e-6 else frac)


def write_midi(notes: list[Note], spec: dict, path: Path, seconds: float) -> float:
    """The MIDI file of `notes`; returns the mean felt tempo over the first `seconds` (after the drift)."""
    import mido

    metre = spec["metre"]
    quarters_per_beat = 1.5 if metre == 6 else 1.0
    ticks = 480
    midi = mido.MidiFile(ticks_per_beat=ticks)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    numerator, denominator = {4: (4, 4), 3: (3, 4), 6: (6, 8)}[metre]
    events = [(0, mido.MetaMessage("time_signature", numerator=numerator, denominator=denominator))]
    rng = np.random.default_rng(spec.get("seed", 0) + 11)
    # Tempo: one slow wave of ±drift across the clip, set every beat.
    total_beats = int(seconds * spec["bpm"] / 60) + 8
    phase = rng.uniform(0, 2 * np.pi)
    beat_tempi = spec["bpm"] * (1 + spec["drift"] * np.sin(phase + 2 * np.pi * np.arange(total_beats) / total_beats))
    for beat, bpm in enumerate(beat_tempi):
        events.append((beat, mido.MetaMessage("set_tempo", tempo=int(60e6 / (bpm * quarters_per_beat)))))
    for channel, part in ((0, "chords"), (1, "bass"), (2, "melody")):
        events.append((0, mido.Message("program_change", channel=channel, program=spec["programs"][part])))
    jitter_beats = spec["humanise_ms"] / 1000 * spec["bpm"] / 60
    for note in notes:
        at = _swung(note.start, spec["swing"]) if note.channel in (9, 2) else note.start
        at = max(0.0, at + rng.normal(0, jitter_beats / 2))
        events.append((at, mido.Message("note_on", channel=note.channel, note=note.pitch, velocity=note.velocity)))
        events.append((at + note.length, mido.Message("note_off", channel=note.channel, note=note.pitch)))
    events.sort(key=lambda e: (e[0], e[1].type != "set_tempo", e[1].type == "note_on"))
    now = 0
    for at, message in events:
        tick = int(round(at * quarters_per_beat * ticks))
        track.append(message.copy(time=tick - now))
        now = tick
    midi.save(path)
    # The felt tempo the listener hears over the clip: beats heard in `seconds`, per minute.
    elapsed = np.cumsum(60.0 / beat_tempi)
    heard = np.searchsorted(elapsed, seconds)
    return float(heard / elapsed[heard - 1] * 60) if heard > 0 else spec["bpm"]


def render(spec: dict, seconds: float) -> tuple[np.ndarray, Piece]:
    """Stereo float32 samples at 44.1 kHz of one composed piece, and its truth."""
    soundfont = next(p for p in SOUNDFONTS if Path(p).is_file())
    metre = spec["metre"]
    beats_per_bar = 2 if metre == 6 else metre
    if spec["cut"]:  # the clip ends before the piece does
        bars = int(np.ceil(seconds * spec["bpm"] / 60 / beats_per_bar)) + 2
    else:  # the final tonic falls inside the clip
        bars = max(4, int(seconds * spec["bpm"] * (1 - spec["drift"]) / 60 / beats_per_bar) - 1)
    notes, truth = compose(spec, bars)
    with tempfile.TemporaryDirectory(prefix="acecap-score-") as scratch:
        midi_path, wav_path = Path(scratch) / "piece.mid", Path(scratch) / "piece.wav"
        felt = write_midi(notes, spec, midi_path, seconds)
        subprocess.run(
            ["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(RATE), "-F", str(wav_path), soundfont, str(midi_path)],
            check=True, capture_output=True,
        )  # fmt: skip
        audio, rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
    ratio = 2 ** (spec["detune_cents"] / 1200)
    if ratio != 1.0:  # played back faster: higher and quicker, as a mistuned tape or sample-rate mix-up
        import soxr

        audio = soxr.resample(audio, rate * ratio, rate).astype(np.float32)
    audio = audio[: int(seconds * RATE)]
    peak = float(np.abs(audio).max()) or 1.0
    audio = 0.8 * audio / peak
    detail = [spec["groove"]]
    detail += ["swing"] if spec["swing"] or spec["groove"] in ("shuffle", "ride-jazz") else []
    detail += [f"drift ±{spec['drift']:.1%}"] if spec["drift"] else []
    detail += [f"detuned {spec['detune_cents']:+.0f} ct"] if spec["detune_cents"] else []
    detail += [f"modulates (home {truth['home_share']:.0%})"] if truth["home_share"] < 1 else []
    detail += ["cut"] if spec["cut"] else []
    detail += ["no melody"] if spec["parts"] == "no-melody" else []
    detail += [f"{spec['harmonic_rhythm']:g} chords/bar"] if spec["harmonic_rhythm"] != 1 else []
    detail += [f"starts on chord {spec['start_chord'] + 1}"] if spec["start_chord"] else []
    detail += [f"{spec['sections'][0]} / {spec['sections'][1]}"]
    piece = Piece(
        name=spec["name"],
        seed=spec["seed"],
        bpm=round(felt * ratio, 2),
        timesignature=metre,
        key=f"{PITCHES[spec['tonic']]} {spec['mode']}",
        groove=spec["groove"],
        detail=", ".join(detail),
    )
    return audio, piece


def pieces(count: int, first_seed: int) -> list[dict]:
    """Specs of `count` pieces from consecutive seeds."""
    return [{**_spec(seed), "seed": seed, "name": f"score{seed}"} for seed in range(first_seed, first_seed + count)]


def issue_pieces(first_seed: int) -> list[dict]:
    """The two sets issue 16 reports, rebuilt: ten band pieces (drum kit with eighth-note hi-hats, bass,
    chords, melody; 84–140 BPM; major and minor; one waltz) and nine of drums and melody only (kick on 1
    and 3, snare on 2 and 4, eighth-note hi-hats). Straight, steady, in tune, ending on the tonic."""
    plain = {"swing": 0.0, "drift": 0.0, "detune_cents": 0.0, "modulate": False, "cut": False, "start_chord": 0,
             "harmonic_rhythm": 1.0}  # fmt: skip
    band = [(84, "A minor"), (96, "F# minor"), (100, "F major"), (110, "C minor"), (90, "G major"),
            (105, "D major"), (120, "E minor"), (128, "A# major"), (136, "B minor"), (140, "D# major")]  # fmt: skip
    specs = []
    for index, (bpm, key) in enumerate(band):
        tonic, mode = key.split()
        waltz = index == 9
        fixed = {**plain, "tonic": PITCHES.index(tonic), "mode": mode, "metre": 3 if waltz else 4}
        fixed.update(bpm=float(bpm), groove="waltz-rock" if waltz else "rock8", parts="full")
        seed = first_seed + index
        specs.append({**_spec(seed, **fixed), "seed": seed, "name": f"issue-band{index}"})
    for index, bpm in enumerate((90, 95, 100, 105, 110, 115, 120, 125, 132)):
        seed = first_seed + 100 + index
        fixed = {**plain, "metre": 4, "bpm": float(bpm), "groove": "rock8", "parts": "melody-only"}
        specs.append({**_spec(seed, **fixed), "seed": seed, "name": f"issue-melody{index}"})
    return specs
