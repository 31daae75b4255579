"""Tempo, key and metre from the signal, on material made with known values."""

import numpy as np
import pytest
from test_benchmarks import load_program

from acecap.meta import analyse

meta = load_program("meta")


def resampled(case, seconds=20.0, seed=0) -> np.ndarray:
    from acecap.audio import to_clip

    return to_clip(meta.render(case, seconds, np.random.default_rng(seed)), meta.RATE).samples


@pytest.mark.parametrize(
    "case",
    [
        meta.Case("pop", "band", 120, 4, "C major"),
        meta.Case("ballad", "band", 72, 4, "F# minor"),
        meta.Case("waltz", "band", 150, 3, "D# major"),
        meta.Case("metronome", "click", 100, 3, None),
    ],
)
def test_known_material(case):
    found = analyse(resampled(case))
    assert abs(found.bpm - case.bpm) <= 2
    assert found.timesignature == case.beats
    if case.key:
        assert found.keyscale == case.key
    assert 0 <= found.bpm_confidence <= 1 and 0 <= found.keyscale_confidence <= 1
    assert found.duration == pytest.approx(20.0, abs=0.01)


def test_too_short_or_silent_says_nothing():
    for samples in (np.zeros(16000 * 10, dtype=np.float32), resampled(meta.Case("x", "band", 120, 4, "C major"), 2.0)):
        found = analyse(samples)
        assert (found.bpm, found.keyscale, found.timesignature) == (None, None, None)
        assert found.bpm_confidence == found.keyscale_confidence == found.timesignature_confidence == 0.0


def test_the_accuracy_program_counts_right(tmp_path):
    report = meta.main(["--cases", "5", "--seconds", "12", "-o", str(tmp_path)])
    rows, summary = report["rows"], report["summary"]
    assert len(rows) == summary["cases"] == 5
    assert summary["bpm_accuracy"] == sum(abs(r["found_bpm"] - r["bpm"]) <= 2 for r in rows) / 5
    keyed = [r for r in rows if r["key"]]
    assert summary["key_cases"] == len(keyed) == 4  # every fifth case is a bare click track
    assert summary["key_accuracy"] == sum(r["found_key"] == r["key"] for r in keyed) / 4
    assert summary["beats_accuracy"] == sum(r["found_beats"] == r["beats"] for r in rows) / 5
    assert (
        f"| tempo within ±2 BPM (half/double wrong) | {summary['bpm_accuracy']:.0%} |"
        in (tmp_path / "meta.md").read_text()
    )
