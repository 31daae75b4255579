"""Benchmarks are programs; here they only run small and their arithmetic is checked."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_program(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_annotate_benchmark_runs_and_computes_its_rates(tmp_path):
    bench = load_program("annotate")
    assert bench.clip_lengths(5, 5, 80) == [5.0, 10.0, 20.0, 40.0, 80.0]
    args = ["--shape", "tiny", "--clips", "3", "--shortest", "1", "--longest", "2", "--tokens", "3"]
    report = bench.main([*args, "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "annotate.json").read_text())
    seed, ours = report["runs"]
    for run in (seed, ours):
        assert run["files"] == 3
        assert run["audio_seconds"] == pytest.approx(sum(report["setup"]["lengths"]), abs=0.01)
        assert run["audio_seconds_per_s"] == pytest.approx(run["audio_seconds"] / run["wall_s"])
        assert run["files_per_min"] == pytest.approx(run["files"] / run["wall_s"] * 60)
    assert report["ratio"] == pytest.approx(ours["audio_seconds_per_s"] / seed["audio_seconds_per_s"])
    assert f"{report['ratio']:.2f}×" in (tmp_path / "annotate.md").read_text()
