"""acecap bench: it runs small on the CPU, and every rate it reports is a count over a measured time."""

import json
import logging
import statistics

import pytest
from conftest import run_acecap
from PIL import Image

from acecap.bench import TABLE_HEAD, Point, peak_bandwidth, peak_flops, prefill_flops


def test_rates_are_counts_over_measured_times():
    point = Point("static", batch=2, seconds=10.0, tokens=5, first_token_s=[1.0, 1.0, 1.0],
                  total_s=[3.0, 3.0, 3.0], peak_memory_bytes=0, step_bytes=10**9, prefill_flops=6e12)  # fmt: skip
    figures = point.figures(peak_bandwidth=4e9, peak_flops=10e12)
    # 4 decode steps in 2 s: 0.5 s a step.
    assert figures["step_ms"] == pytest.approx(500)
    assert figures["decode_tok_s_per_stream"] == pytest.approx(2.0)
    assert figures["decode_tok_s"] == pytest.approx(4.0)
    assert figures["output_tok_s"] == pytest.approx(10 / 3)
    assert figures["requests_per_s"] == pytest.approx(2 / 3)
    assert figures["audio_s_per_s"] == pytest.approx(20 / 3)
    assert figures["bandwidth_gb_s"] == pytest.approx(2.0)
    assert figures["bandwidth_share"] == pytest.approx(0.5)
    assert figures["prefill_tflop_s"] == pytest.approx(6.0)  # 6 TFLOP in the 1 s to the first token
    assert figures["prefill_peak_share"] == pytest.approx(0.6)
    assert Point("static", 1, 1.0, 5, [], [], 0, 0, error="OutOfMemoryError").figures(None) == {}


def test_prefill_flops_of_a_three_minute_song_at_the_7b_shapes():
    import torch
    from transformers import Qwen2_5OmniThinkerConfig

    from acecap.model import AudioThinker
    from acecap.tiny import full_config

    with torch.device("meta"):  # the 7B shapes without their memory
        thinker = AudioThinker(Qwen2_5OmniThinkerConfig(**full_config("7b")["thinker_config"]))
    samples, tokens = 180 * 16000, 4530  # 4,500 audio tokens and the chat text's
    flops = prefill_flops(thinker, tokens, samples)
    hidden, kv, mlp = 3584, 512, 18944  # 28 layers of 7B: q, k, v (with biases), o, gate/up/down, two norms
    layers = 28 * (2 * hidden * hidden + hidden + 2 * (hidden * kv + kv) + 3 * hidden * mlp + 2 * hidden)
    causal = 2 * tokens**2 * 3584 * 28  # QK and AV over the lower triangle, 2 FLOPs a multiply-add
    assert flops["language_model"] == 2 * layers * tokens + causal + 2 * 152064 * 3584
    assert 11.0e12 < flops["audio_encoder"] < 12.0e12  # 9,000 encoder tokens through 32 layers of 1280


def test_peak_bandwidth_is_known_only_for_named_cards():
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("Ascend910B2") == 1.6e12
    assert peak_bandwidth("2 CPU cores") is None
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200 NVL") == 835e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("2 CPU cores") is None


@pytest.mark.slow
def test_bench_command_runs_on_the_tiny_shape(tmp_path):
    args = ["--device", "cpu", "--shapes", "tiny", "--decoders", "static,transformers", "--batch-sizes", "1,2"]
    done = run_acecap("bench", *args, "--seconds", "2", "--tokens", "6", "--repeats", "2", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["setup"]["device"] == "cpu" and report["setup"]["peak_bandwidth"] is None
    assert report["setup"]["peak_bf16_flops"] is None
    assert [(run["decoder"], run["batch"]) for run in report["runs"]] == [
        ("static", 1), ("static", 2), ("transformers", 1), ("transformers", 2),
    ]  # fmt: skip
    for run in report["runs"]:
        assert run["error"] is None and len(run["total_s"]) == len(run["first_token_s"]) == 2
        total = statistics.mean(run["total_s"])
        decode = statistics.mean(t - f for t, f in zip(run["total_s"], run["first_token_s"], strict=True))
        assert run["decode_tok_s_per_stream"] == pytest.approx(5 / decode)
        assert run["output_tok_s"] == pytest.approx(run["batch"] * 6 / total)
        assert run["audio_s_per_s"] == pytest.approx(run["batch"] * 2.0 / total)
        assert (run["ttft_min_s"], run["ttft_max_s"]) == (min(run["first_token_s"]), max(run["first_token_s"]))
        assert run["bandwidth_gb_s"] == pytest.approx(run["step_bytes"] / (decode / 5) / 1e9)
        # The weights and the work, not the interpreter and its libraries (about 1 GiB of resident memory). The
        # transformers decoder on 4.57 grows by 470-520 MiB here (torch's and oneDNN's caches): 768 MiB leaves room.
        assert report["setup"]["weight_bytes"] < run["peak_memory_bytes"] < 3 * 2**28
        ttft = statistics.mean(run["first_token_s"])
        assert run["prefill_tflop_s"] == pytest.approx(run["prefill_flops"] / ttft / 1e12) and run["prefill_flops"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| static |") == 2 and table.count("| transformers |") == 2
    assert done.stdout == f"report: {tmp_path / 'bench.md'} (with bench.json and bench.png)\n"
    assert done.stderr.count(TABLE_HEAD[0]) == 1 and done.stderr.count("| static |") == 2  # the table once, as measured
    with Image.open(tmp_path / "bench.png") as plot:  # a real PNG of throughput against batch size
        assert plot.format == "PNG" and plot.size[0] > 400


@pytest.mark.slow
def test_bench_refuses_bad_options_before_loading(tmp_path):
    done = run_acecap("bench", "--device", "cpu", "--batch-sizes", "1,x", "-o", str(tmp_path))
    assert done.returncode == 2 and "--batch-sizes" in done.stderr
    done = run_acecap("bench", "--device", "cpu", "--decoders", "graphs", "-o", str(tmp_path))
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
    done = run_acecap("bench", "--device", "cpu", "--seconds", "0", "-o", str(tmp_path))
    assert done.returncode == 2 and "--seconds 0: give a clip length" in done.stderr
    (tmp_path / "taken").write_text("a file where the report's folder should go")
    done = run_acecap("bench", "--device", "cpu", "--shapes", "tiny", "-o", str(tmp_path / "taken"))
    assert done.returncode == 2 and "is a file" in done.stderr and "| static |" not in done.stderr


def test_bench_measures_the_whole_clip_it_reports_or_refuses_it(caplog):
    """Clips past the default --max-duration (300 s) are captioned whole; past the context, refused."""
    from acecap.bench import bench

    caplog.set_level(logging.WARNING, logger="acecap")
    report = bench(shape="tiny", device="cpu", decoders=["static"], batch_sizes=[1], seconds=320.0, tokens=2,
                   repeats=1, log=lambda line: None)  # fmt: skip
    (run,) = report["runs"]
    assert run["error"] is None and report["setup"]["seconds"] == 320.0
    assert "captioning the first" not in caplog.text  # all 320 s went in, as the report says
    with pytest.raises(ValueError, match="takes at most"):
        bench(shape="tiny", device="cpu", decoders=["static"], batch_sizes=[1], seconds=1e5, tokens=2, repeats=1,
              log=lambda line: None)  # fmt: skip
