"""Fit the weights of rhythm.py's beat-level decision on the dev split of benchmarks/meta.py, never the held-out.

Each clip's candidate levels (a first period and its relatives, rhythm.candidates) are described by
rhythm.level_features; a candidate is right when its tempo is within ±2 BPM of the truth. A conditional logit
(softmax over a clip's candidates, L2 penalty) is fitted to make the right candidates likely. Clips where
every candidate or none is right carry no information and are left out of the fit, not of the accuracy.

The L2 strength is chosen by 5-fold cross-validation over the dev clips; the report also gives each corpus's
accuracy when the weights are fitted on the other corpus alone (how far the fit carries to material made
another way), and the fitted weights as the Python literal rhythm.LEVEL_WEIGHTS holds.

    python benchmarks/meta_fit.py --cases 240 --cache /tmp/meta-cache     # 240 synth + 240 scores clips
    python benchmarks/meta_fit.py --corpus synth --cases 6 --seconds 12 -o /tmp/fit   # smoke run

Writes meta-fit.json and meta-fit.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meta  # noqa: E402

from acecap import rhythm  # noqa: E402
from acecap.audio import load_audio, to_clip  # noqa: E402

L2_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
FOLDS = 5


@dataclass
class Clip:
    corpus: str
    features: np.ndarray  # candidates × LEVEL_FEATURES
    right: np.ndarray  # bool per candidate: its tempo within ±2 BPM of the truth


def describe(corpus: str, samples: np.ndarray, bpm: float) -> Clip:
    e = rhythm.envelopes(samples)
    rows, right = [], []
    for lag, periodicity, beats in rhythm.candidates(e):
        rows.append(rhythm.level_features(e, lag, periodicity, beats))
        right.append(abs(round(rhythm.fitted_bpm(e.onsets, beats)) - bpm) <= 2)
    return Clip(corpus, np.array(rows).reshape(len(rows), len(rhythm.LEVEL_FEATURES)), np.array(right, dtype=bool))


def loss(weights: np.ndarray, clips: list[Clip], l2: float) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of the right candidates (and its gradient), plus l2 · |weights|²."""
    total, gradient = l2 * float(weights @ weights), 2 * l2 * weights
    for clip in clips:
        if not clip.right.any() or clip.right.all():
            continue
        scores = clip.features @ weights
        p = np.exp(scores - scores.max())
        p /= p.sum()
        right = (p * clip.right).sum()
        total -= np.log(right)
        gradient = gradient - clip.features.T @ (p * clip.right / right - p)
    return total, gradient


def fit(clips: list[Clip], l2: float) -> np.ndarray:
    start = np.zeros(len(rhythm.LEVEL_FEATURES))
    return minimize(loss, start, args=(clips, l2), jac=True, method="L-BFGS-B").x


def accuracy(weights: np.ndarray, clips: list[Clip]) -> float:
    """Share of clips whose highest-scoring candidate is right (a clip without candidates counts as wrong)."""
    return float(np.mean([len(c.right) > 0 and bool(c.right[int(np.argmax(c.features @ weights))]) for c in clips]))


def cross_validated(clips: list[Clip], l2: float, folds: int = FOLDS, seed: int = 0) -> float:
    order = np.random.default_rng(seed).permutation(len(clips))
    scores = []
    for held in np.array_split(order, folds):
        kept = set(held.tolist())
        weights = fit([clips[i] for i in order if i not in kept], l2)
        scores.append(accuracy(weights, [clips[i] for i in held]))
    return float(np.mean(scores))


def report(clips: list[Clip], grid: tuple[float, ...] = L2_GRID) -> dict:
    cv = {str(l2): cross_validated(clips, l2) for l2 in grid}
    best = float(max(cv, key=lambda k: cv[k]))
    weights = fit(clips, best)
    corpora = sorted({c.corpus for c in clips})
    transfer = {}
    for corpus in corpora if len(corpora) > 1 else []:
        trained = fit([c for c in clips if c.corpus != corpus], best)
        transfer[corpus] = accuracy(trained, [c for c in clips if c.corpus == corpus])
    return {
        "clips": {corpus: sum(c.corpus == corpus for c in clips) for corpus in corpora},
        "cross_validated": cv,
        "l2": best,
        "accuracy": {
            "fitted": accuracy(weights, clips),
            "shipped": accuracy(rhythm.LEVEL_WEIGHTS, clips),
            "candidates_hold_the_truth": float(np.mean([c.right.any() for c in clips])),
        },
        "fitted_on_the_other_corpus": transfer,
        "weights": dict(zip(rhythm.LEVEL_FEATURES, np.round(weights, 2).tolist(), strict=True)),
    }


def markdown(result: dict) -> str:
    clips = ", ".join(f"{count} {corpus}" for corpus, count in result["clips"].items())
    acc = result["accuracy"]
    lines = [
        f"Dev split only ({clips}); tempo right = within ±2 BPM.",
        "",
        "| L2 | 5-fold cross-validated accuracy |",
        "| --- | --- |",
        *(f"| {l2} | {share:.1%} |" for l2, share in result["cross_validated"].items()),
        "",
        f"Chosen L2 {result['l2']:g}: {acc['fitted']:.1%} on the clips it was fitted on; the weights rhythm.py "
        f"ships: {acc['shipped']:.1%}; some candidate is right on {acc['candidates_hold_the_truth']:.1%}.",
    ]
    for corpus, share in result["fitted_on_the_other_corpus"].items():
        lines.append(f"Fitted without `{corpus}`, then scored on it: {share:.1%}.")
    values = ", ".join(f"{v:g}" for v in result["weights"].values())
    lines += ["", "```", f"LEVEL_WEIGHTS = np.array([{values}])", "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="synth,scores", help="comma list of synth, scores")
    parser.add_argument("--cases", type=int, default=240, help="clips per corpus")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--cache", type=Path, help="rendered clips, shared with benchmarks/meta.py")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    corpora = args.corpus.split(",")
    if set(corpora) - {"synth", "scores"}:
        parser.error("fit on the dev split's synth and scores corpora only")
    clips = []
    for corpus in corpora:
        for source, truth in meta._cached(args.cache, corpus, "dev", args.cases, args.seconds):
            samples = load_audio(source).samples if isinstance(source, Path) else _mono(source)
            clips.append(describe(corpus, samples, truth["bpm"]))
    result = report(clips)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "meta-fit.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output_dir / "meta-fit.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


def _mono(audio: np.ndarray) -> np.ndarray:
    """A clip rendered in memory, as acecap's loader would hand it over."""
    return to_clip(audio, meta.meta_synth.RATE).samples


if __name__ == "__main__":
    main()
