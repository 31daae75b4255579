"""Tempo, key and metre accuracy of the `meta` task's signal analysis, on corpora whose truth is known.

Corpora, built by different methods:
- `synth`  (meta_synth.py): drum sounds, chord tones and clicks synthesised with numpy;
- `scores` (meta_scores.py): pieces composed as symbolic scores (grooves with syncopation, swing, 16th
  hi-hats; relative-key loops; modulations; tempo drift; detuning) rendered by fluidsynth with a General
  MIDI soundfont;
- `issue`  (meta_scores.py): the two sets of pieces issue 16 reported, rebuilt (held-out split only);
- `beatless` (meta_beatless.py): noise, drones and glides (numpy) and held chords changing at irregular
  times (fluidsynth): no tempo to find, so what is scored is whether the tempo's confidence says so (the
  share below the default --meta-min-confidence, 0.3, which leaves it out of the ACE-Step files).

Splits: `dev` draws seeds from 0, `heldout` from 100000, `heldout2` from 200000. Develop and tune on dev only
(benchmarks/meta_fit.py fits the beat-level weights on it); run a held-out split once, to report. `heldout`
was run and its misses studied in an earlier round, so `heldout2` is the one never looked at before its run.
Every clip is written as a 44.1 kHz stereo file and read back through acecap's own audio loader, then
analysed as `acecap annotate --tasks meta` does.

Scores: tempo within ±2 BPM (a half or double is wrong), MIREX Acc1 (±4 %) and Acc2 (±4 % of the tempo or
its double, half, triple or third); key exact and the MIREX weighted score (1 exact, 0.5 the dominant,
0.3 relative, 0.2 parallel, as mir_eval); time signature exact; process CPU seconds per minute of audio.

    python benchmarks/meta.py --split dev                       # 60 synth + 120 scores clips of 30 s
    python benchmarks/meta.py --split heldout2 --cases 240      # once, at the end
    python benchmarks/meta.py --split dev --cases 4 -o /tmp/m   # smoke run

Writes meta-<split>.json and meta-<split>.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the corpus builders beside this file

import meta_beatless  # noqa: E402
import meta_scores  # noqa: E402
import meta_synth  # noqa: E402

from acecap.audio import load_audio  # noqa: E402
from acecap.meta import PITCHES, analyse  # noqa: E402

SPLITS = {"dev": 0, "heldout": 100000, "heldout2": 200000}
CORPORA = ("synth", "scores", "issue", "beatless")
DEFAULT_MIN_CONFIDENCE = 0.3  # annotate's --meta-min-confidence
KEY_WEIGHTS = {"exact": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2, "other": 0.0, "none": 0.0}
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.5)
WITHHELD = ("bpm", "keyscale", "timesignature")  # values that can fall below the default threshold


def key_relation(truth: str, found: str | None) -> str:
    """How a found key relates to the true one, as MIREX and mir_eval score it (the fifth: the dominant)."""
    if found is None:
        return "none"
    (tonic, mode), (found_tonic, found_mode) = truth.split(), found.split()
    interval = (PITCHES.index(found_tonic) - PITCHES.index(tonic)) % 12
    if mode == found_mode:
        return "exact" if interval == 0 else "fifth" if interval == 7 else "other"
    if interval == 0:
        return "parallel"
    return "relative" if interval == (9 if mode == "major" else 3) else "other"


def tempo_scores(truth: float | None, found: int | None) -> dict:
    if truth is None:  # no beat: nothing to be right about (see `withheld`)
        return {"bpm_ok": None, "acc1": None, "acc2": None}
    if found is None:
        return {"bpm_ok": False, "acc1": False, "acc2": False}
    near = [abs(found - truth * factor) <= 0.04 * truth * factor for factor in (1, 2, 0.5, 3, 1 / 3)]
    return {"bpm_ok": abs(found - truth) <= 2, "acc1": near[0], "acc2": any(near)}


def score(corpus: str, truth: dict, found: dict) -> dict:
    relation = None if truth["key"] is None else key_relation(truth["key"], found["keyscale"])
    return {
        "corpus": corpus,
        **truth,
        "found_bpm": found["bpm"],
        "found_key": found["keyscale"],
        "found_timesignature": found["timesignature"],
        "confidence": {k: found[f"{k}_confidence"] for k in ("bpm", "keyscale", "timesignature")},
        **tempo_scores(truth["bpm"], found["bpm"]),
        "key_relation": relation,
        "key_ok": None if relation is None else relation == "exact",
        "key_weighted": None if relation is None else KEY_WEIGHTS[relation],
        "metre_ok": None if truth["timesignature"] is None else found["timesignature"] == truth["timesignature"],
        "withheld": {k: found[f"{k}_confidence"] < DEFAULT_MIN_CONFIDENCE for k in WITHHELD},
        "cpu_s": found["cpu_s"],
        "audio_s": found["duration"],
    }


def summarise(rows: list[dict]) -> dict:
    beatless = [r for r in rows if r["bpm"] is None]
    noise = [r for r in beatless if r.get("detail", "").endswith(" noise")]  # white, pink, brown: no key either
    timed = [r for r in rows if r["bpm"] is not None]
    keyed = [r for r in rows if r["key_ok"] is not None]
    share = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    relations = {name: sum(r["key_relation"] == name for r in keyed) for name in KEY_WEIGHTS}
    by_threshold = {}
    for threshold in THRESHOLDS:
        entry = {}
        for value, ok in (("bpm", "bpm_ok"), ("keyscale", "key_ok"), ("timesignature", "metre_ok")):
            subset = [r for r in rows if r[ok] is not None]
            kept = [r for r in subset if r["confidence"][value] >= threshold]
            entry[value] = {"kept": share([r in kept for r in subset]), "accuracy": share([r[ok] for r in kept])}
        by_threshold[str(threshold)] = entry
    return {
        "cases": len(rows),
        "bpm_within_2": share([r["bpm_ok"] for r in timed]),
        "acc1": share([r["acc1"] for r in timed]),
        "acc2": share([r["acc2"] for r in timed]),
        "key_cases": len(keyed),
        "key_exact": share([r["key_ok"] for r in keyed]),
        "key_weighted": share([r["key_weighted"] for r in keyed]),
        "key_relations": relations,
        "metre_exact": share([r["metre_ok"] for r in timed]),
        "beatless_cases": len(beatless),  # and of them, the tempo and metre left out at the default threshold:
        "tempo_withheld": share([r["withheld"]["bpm"] for r in beatless]),
        "metre_withheld": share([r["withheld"]["timesignature"] for r in beatless]),
        "noise_cases": len(noise),
        "noise_key_withheld": share([r["withheld"]["keyscale"] for r in noise]),
        "cpu_s_per_audio_min": sum(r["cpu_s"] for r in rows) / (sum(r["audio_s"] for r in rows) / 60) if rows else None,
        "by_confidence": by_threshold,
    }


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Split `{setup['split']}`, clips of {setup['seconds']:.0f} s; {setup['machine']}, librosa "
        f"{setup['librosa']}; analysis CPU time is process time (all threads).",
        "",
        "| corpus | clips | tempo ±2 BPM | Acc1 (±4 %) | Acc2 | key exact | key weighted | metre exact "
        "| no beat: tempo / metre withheld | noise: key withheld | CPU s per audio min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in report["summary"].items():
        withheld = f"{_percent(s['tempo_withheld'])} / {_percent(s['metre_withheld'])}" if s["beatless_cases"] else "–"
        lines.append(
            f"| {name} | {s['cases']} | {_percent(s['bpm_within_2'])} | {_percent(s['acc1'])} | "
            f"{_percent(s['acc2'])} | {_percent(s['key_exact'])} of {s['key_cases']} | "
            f"{'–' if s['key_weighted'] is None else format(s['key_weighted'], '.3f')} | "
            f"{_percent(s['metre_exact'])} | {withheld} | {_percent(s['noise_key_withheld'])} of {s['noise_cases']} | "
            f"{s['cpu_s_per_audio_min']:.3f} |"
        )
    total = report["summary"]["all"]
    relations = ", ".join(f"{name} {count}" for name, count in total["key_relations"].items() if count)
    lines += ["", f"Keys found, against the truth (all corpora): {relations}.", ""]
    lines += ["| min confidence | tempo kept / right | key kept / right | metre kept / right |"]
    lines += ["| --- | --- | --- | --- |"]
    for threshold, entry in total["by_confidence"].items():
        cells = [f"{_percent(entry[v]['kept'])} / {_percent(entry[v]['accuracy'])}" for v in entry]
        lines.append(f"| {threshold} | " + " | ".join(cells) + " |")
    lines += ["", "| clip | truth | found | wrong |", "| --- | --- | --- | --- |"]
    for r in report["rows"]:
        truth = "no beat" if r["bpm"] is None else f"{r['bpm']:g} BPM, {r['timesignature']}, {r['key'] or 'no key'}"
        found = f"{r['found_bpm']} BPM, {r['found_timesignature']}, {r['found_key']}"
        if r["bpm"] is None:
            found += f" (tempo confidence {r['confidence']['bpm']:.2f})"
        wrong = [name for name, ok in (("tempo", r["bpm_ok"]), ("metre", r["metre_ok"])) if ok is False]
        wrong += [f"{name} kept" for name, kept in (("tempo", not r["withheld"]["bpm"]),
                  ("metre", not r["withheld"]["timesignature"])) if r["bpm"] is None and kept]  # fmt: skip
        if r["key_ok"] is False:
            wrong.append(f"key ({r['key_relation']})")
        lines.append(f"| {r['name']} ({r['detail']}) | {truth} | {found} | {', '.join(wrong)} |")
    return "\n".join(lines)


def _synth_clips(count: int, seed: int, seconds: float):
    for index, case in enumerate(meta_synth.cases(count, seed)):
        mono = meta_synth.render(case, seconds, np.random.default_rng([seed, index]))
        truth = {"name": case.name, "bpm": float(case.bpm), "timesignature": case.timesignature, "key": case.key}
        hats = case.kind == "band" and case.timesignature != 6
        truth["detail"] = f"{case.kind}, {case.hats}th hats" if hats else case.kind
        yield np.stack([mono, mono], axis=1), truth


def _score_clips(specs: list[dict], seconds: float):
    for spec in specs:
        audio, piece = meta_scores.render(spec, seconds)
        truth = {k: getattr(piece, k) for k in ("name", "bpm", "timesignature", "key", "detail")}
        yield audio, truth


def clips(corpus: str, split: str, count: int, seconds: float):
    """(44.1 kHz stereo samples, truth) for each clip of a corpus's split."""
    first = SPLITS[split]
    if corpus == "synth":
        return _synth_clips(count, first, seconds)
    if corpus == "scores":
        return _score_clips(meta_scores.pieces(count, first), seconds)
    if corpus == "beatless":
        return meta_beatless.clips(count, first, seconds)
    if split == "dev":
        raise ValueError("the issue corpus is held out: run it with a held-out split")
    return _score_clips(meta_scores.issue_pieces(first + 50000), seconds)


def _cached(cache: Path | None, corpus: str, split: str, count: int, seconds: float):
    """The clips, from the cache folder when it has them (tuning runs only the analysis again)."""
    if cache is None:
        yield from clips(corpus, split, count, seconds)
        return
    folder = cache / f"{corpus}-{split}-{seconds:g}s"
    index_path = folder / f"index-{count}.json"
    if index_path.is_file():
        for truth in json.loads(index_path.read_text()):
            yield folder / f"{truth['name']}.flac", truth
        return
    folder.mkdir(parents=True, exist_ok=True)
    truths = []
    for audio, truth in clips(corpus, split, count, seconds):
        path = folder / f"{truth['name']}.flac"
        soundfile.write(path, audio, meta_synth.RATE)
        truths.append(truth)
        yield path, truth
    index_path.write_text(json.dumps(truths, indent=1))


def run(corpora: list[str], split: str, counts: dict[str, int], seconds: float, cache: Path | None) -> list[dict]:
    analyse(np.random.default_rng(0).standard_normal(16000 * 8).astype(np.float32))  # compile and import first
    rows = []
    with tempfile.TemporaryDirectory(prefix="acecap-meta-") as scratch:
        for corpus in corpora:
            for source, truth in _cached(cache, corpus, split, counts[corpus], seconds):
                path = source
                if not isinstance(source, Path):
                    path = Path(scratch) / f"{truth['name']}.wav"
                    soundfile.write(path, source, meta_synth.RATE)
                clip = load_audio(path)
                start = time.process_time()
                found = analyse(clip.samples).to_dict()
                found["cpu_s"] = time.process_time() - start
                rows.append(score(corpus, truth, found))
                print(f"{truth['name']}: {rows[-1]['found_bpm']} {rows[-1]['found_key']} "
                      f"{rows[-1]['found_timesignature']} (truth {truth['bpm']} {truth['key']} "
                      f"{truth['timesignature']})", file=sys.stderr)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=list(SPLITS), default="dev")
    parser.add_argument("--corpus", help=f"comma list of {', '.join(CORPORA)} (default: all the split has)")
    parser.add_argument("--cases", type=int, help="clips per seeded corpus (default 60 synth, 120 scores)")
    parser.add_argument("--beatless", type=int, default=60, help="clips of the beatless corpus (default 60)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    parser.add_argument("--cache", type=Path, help="keep rendered clips here and reuse them")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import librosa

    corpora = args.corpus.split(",") if args.corpus else [c for c in CORPORA if c != "issue" or args.split != "dev"]
    unknown = set(corpora) - set(CORPORA)
    if unknown:
        parser.error(f"unknown corpus {', '.join(sorted(unknown))}")
    missing = meta_scores.fluidsynth_available()
    if missing and set(corpora) & {"scores", "issue", "beatless"}:
        parser.error(f"the scores, issue and beatless corpora need fluidsynth: {missing}")
    counts = {"synth": args.cases or 60, "scores": args.cases or 120, "issue": 19, "beatless": args.beatless}
    rows = run(corpora, args.split, counts, args.seconds, args.cache)
    summary = {corpus: summarise([r for r in rows if r["corpus"] == corpus]) for corpus in corpora}
    summary["all"] = summarise(rows)
    report = {
        "setup": {
            "machine": f"{platform.machine()}, {platform.platform()}",
            "librosa": librosa.__version__,
            "split": args.split,
            "first_seed": SPLITS[args.split],
            "corpora": corpora,
            "seconds": args.seconds,
        },
        "summary": summary,
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"meta-{args.split}.json").write_text(json.dumps(report, indent=2, default=asdict) + "\n")
    (args.output_dir / f"meta-{args.split}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
