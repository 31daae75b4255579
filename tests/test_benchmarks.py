"""Benchmarks are programs; here they only run small and their arithmetic is checked."""

import importlib.util
import json
import math
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


@pytest.mark.slow
def test_annotate_benchmark_runs_and_computes_its_rates(tmp_path):
    bench = load_program("annotate")
    assert bench.clip_lengths(5, 5, 80) == [5.0, 10.0, 20.0, 40.0, 80.0]
    args = ["--shape", "tiny", "--clips", "3", "--shortest", "1", "--longest", "2", "--tokens", "3"]
    report = bench.main([*args, "--decoders", "static,transformers", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "annotate.json").read_text())
    seed, static, transformers = report["runs"]
    assert [run["pipeline"] for run in report["runs"]] == [
        "seed pipeline",
        "acecap annotate (static decoder)",
        "acecap annotate (transformers decoder)",
    ]
    table = (tmp_path / "annotate.md").read_text()
    for run in (seed, static, transformers):
        assert run["files"] == 3
        assert run["audio_seconds"] == pytest.approx(sum(report["setup"]["lengths"]), abs=0.01)
        assert run["audio_seconds_per_s"] == pytest.approx(run["audio_seconds"] / run["wall_s"])
        assert run["files_per_min"] == pytest.approx(run["files"] / run["wall_s"] * 60)
        assert run["speedup"] == pytest.approx(run["audio_seconds_per_s"] / seed["audio_seconds_per_s"])
        assert f"| {run['speedup']:.2f}× |" in table
    assert seed["speedup"] == 1.0


@pytest.mark.slow
def test_encoder_benchmark_runs_and_agrees_with_the_library(tmp_path):
    import transformers

    bench = load_program("encoder")
    report = bench.main(["--shape", "tiny", "--cases", "2x3", "1x40", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / f"encoder-{transformers.__version__}.json").read_text())
    cases = [(case["clips"], case["seconds"], case["rows"]) for case in report["cases"]]
    assert cases == [(2, 3.0, 150), (1, 40.0, 1000)]  # 25 audio tokens a second
    for case in report["cases"]:
        assert case["max_difference"] < 1e-4
        assert case["speedup"] == pytest.approx(case["transformers_s"] / case["acecap_s"])
    assert f"{report['cases'][1]['speedup']:.1f}×" in (tmp_path / f"encoder-{transformers.__version__}.md").read_text()


@pytest.mark.slow
def test_serve_load_benchmark_answers_every_request_once_and_computes_its_rates(tmp_path):
    bench = load_program("serve_load")
    args = ["--shape", "tiny", "--clients", "6", "--duration", "2", "--seconds", "1", "--tokens", "4"]
    report = bench.main([*args, "--max-batch-size", "4", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "serve_load.json").read_text())
    for run in report["runs"]:
        assert run["each_answered_once"] and run["server_counted"] == run["sent"] == run["answered"]
        assert run["ok"] == run["sent"] >= 6 and run["errors"] == 0
        assert run["requests_per_s"] == pytest.approx(run["ok"] / run["wall_s"])
        assert run["completion_tokens"] == 4 * run["ok"]
        assert run["output_tokens_per_s"] == pytest.approx(run["completion_tokens"] / run["wall_s"])
        assert run["latency_p50_s"] <= run["latency_p99_s"] <= run["wall_s"]
    on, off = report["runs"]
    assert report["gain"] == pytest.approx(on["requests_per_s"] / off["requests_per_s"])
    assert f"{report['gain']:.2f}×" in (tmp_path / "serve_load.md").read_text()


def test_pipeline_benchmark_runs_and_computes_its_rates(tmp_path):
    bench = load_program("pipeline")
    report = bench.main(["--songs", "3", "--seconds", "3", "--workers", "1,2", "--batch", "2", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "pipeline.json").read_text())
    one, two = report["runs"]
    for run in report["runs"]:
        assert run["songs"] == 3 and run["errors"] == 0
        assert run["audio_seconds"] == pytest.approx(report["setup"]["audio_seconds"], abs=0.01)
        assert run["songs_per_s"] == pytest.approx(3 / run["wall_s"])
        assert run["audio_seconds_per_s"] == pytest.approx(run["audio_seconds"] / run["wall_s"])
        assert run["worker_cpu_s_per_song"] > 0 and run["consumer_cpu_s_per_song"] > 0
    assert two["speedup"] == pytest.approx(two["songs_per_s"] / one["songs_per_s"])
    need = report["cores_needed"]
    per_song = min(one["worker_cpu_s_per_song"], two["worker_cpu_s_per_song"])
    assert need["songs_per_s"] == pytest.approx(800 / report["setup"]["mean_song_s"])
    assert need["cores"] == math.ceil(need["songs_per_s"] * per_song) + 1
    assert f"**{need['cores']} cores**" in (tmp_path / "pipeline.md").read_text()


def test_prefill_benchmark_runs_and_packed_equals_clip_by_clip(tmp_path):
    bench = load_program("prefill")
    report = bench.main(["--shape", "tiny", "--dtype", "fp32", "--cases", "3x2", "2x5", "--budget", "200",
                         "-o", str(tmp_path)])  # fmt: skip
    assert report == json.loads((tmp_path / "prefill.json").read_text())
    for case in report["prefill"]:
        assert case["max_logit_difference"] < 1e-4  # a 2 s prompt and a 5 s one cross the 200-token passes
        assert case["speedup"] == pytest.approx(case["clip_by_clip_s"] / case["packed_s"])
        assert f"{case['speedup']:.2f}×" in (tmp_path / "prefill.md").read_text()
    for case in report["attention"]:
        assert case["max_difference"] < 1e-4
        assert (
            case["pass_tokens"] == case["clips"] * report["prefill"][report["attention"].index(case)]["prompt_tokens"]
        )
        assert case["ratio"] == pytest.approx(case["block_diagonal_s"] / case["per_prompt_s"])


def test_startup_benchmark_runs_and_computes_its_figures(tmp_path):
    bench = load_program("startup")
    report = bench.main(["--repeats", "2", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "startup.json").read_text())
    assert [run["command"] for run in report["runs"]] == list(bench.COMMANDS)
    table = (tmp_path / "startup.md").read_text()
    for run in report["runs"]:
        assert len(run["times_s"]) == 2 and all(t > 0 for t in run["times_s"])
        assert run["median_s"] == pytest.approx(sum(run["times_s"]) / 2)
        assert run["max_s"] == max(run["times_s"])
        assert run["within_budget"] == (run["max_s"] <= report["budget_s"])
        assert f"| `{run['command']}` | {run['median_s']:.3f} | {run['max_s']:.3f} |" in table
