"""--quant on the CPU with the tiny model: what is quantized, its bytes, each decoder, compare, saved folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from conftest import run_acecap

from acecap import Captioner, Decoding
from acecap.audio import Clip
from acecap.compare import Side, compare, parse_side
from acecap.compat import text_model
from acecap.decode import Decoder
from acecap.devices import compiler
from acecap.doctor import quant_lines, thinker_shapes
from acecap.model import RESIDENT_PARAMETERS_7B, checkpoint_shapes
from acecap.quant import QUANTIZED_WEIGHT, QuantError, check, int4_group, resident_bytes, tensor_bytes

GiB = 2**30


def noise_clips(seconds: list[float]) -> list[Clip]:
    rng = np.random.default_rng(0)
    return [Clip((0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32), f"{s}s") for s in seconds]


@pytest.fixture(scope="module")
def int8(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model, device="cpu", quant="int8", decoder="static")


def test_only_the_language_models_projections_are_quantized(int8):
    thinker = int8.thinker
    assert int8.dtype == torch.bfloat16 and int8.quant == "int8"  # dtype auto means bf16 with --quant
    quantized = {name for name, p in thinker.named_parameters() if type(p).__name__ == "Int8Tensor"}
    projections = {name for name, _ in thinker.named_parameters() if QUANTIZED_WEIGHT.match(name)}
    assert quantized == projections and len(quantized) == 2 * 7  # 2 layers × q, k, v, o, gate, up, down
    assert not any("audio_tower" in name or "lm_head" in name or "embed" in name for name in quantized)


@pytest.mark.parametrize("quant", ["none", "int8", "int4", "fp8"])
def test_resident_bytes_from_the_checkpoint_shapes_are_the_loaded_models(tiny_model, quant):
    """The figure doctor and the fit check use, from safetensors headers, against the tensors torchao made."""
    captioner = Captioner.from_pretrained(tiny_model, device="cpu", dtype="bf16", quant=quant)
    loaded = sum(tensor_bytes(p) for p in captioner.thinker.parameters())
    assert loaded == resident_bytes(checkpoint_shapes(tiny_model), quant, torch.bfloat16)


def test_int4_groups_and_the_7b_figures():
    assert [int4_group(n) for n in (3584, 18944, 64, 96, 100)] == [128, 128, 64, 32, None]
    shapes = thinker_shapes()
    assert sum(np.prod(shape) for _, shape in shapes) == RESIDENT_PARAMETERS_7B
    bf16 = resident_bytes(shapes, "none", torch.bfloat16)
    quantized = sum(np.prod(shape) for name, shape in shapes if QUANTIZED_WEIGHT.match(name))
    assert quantized == 28 * (3584 * (3584 + 2 * 512 + 3584) + 3 * 3584 * 18944)  # q, k, v, o; gate, up, down
    # int8 and fp8 keep one byte a weight (plus a scale per row); int4 half a byte plus a bf16 scale and zero
    # per 128 weights; the rest stays bf16.
    rest = bf16 - 2 * quantized
    rows = 28 * (3 * 3584 + 2 * 512 + 2 * 18944)
    assert resident_bytes(shapes, "int8", torch.bfloat16) == rest + quantized + rows * 5
    assert resident_bytes(shapes, "int4", torch.bfloat16) == rest + quantized // 2 + quantized // 128 * 4
    # On CUDA, tinygemm pads 3584 input features to 4096 (and 18944 to 19456).
    assert resident_bytes(shapes, "int4", torch.bfloat16, "cuda") > resident_bytes(shapes, "int4", torch.bfloat16)


def test_doctor_says_which_quantizations_fit():
    lines = quant_lines(torch.device("cpu"), torch.float32, (7 * GiB, 24 * GiB))
    none_fp32, none_bf16, int8, int4, fp8 = lines[1:]
    assert "7.0 GiB free now" in lines[0]
    assert "none (fp32)" in none_fp32 and "30.8 GiB" in none_fp32 and none_fp32.endswith("does not fit")
    assert "none (bf16)" in none_bf16 and "15.4 GiB" in none_bf16 and none_bf16.endswith("does not fit")
    assert "int8" in int8 and int8.endswith("does not fit") and "int4" in int4 and int4.endswith(" fits")
    assert "fp8" in fp8


def test_int8_runs_through_the_static_and_transformers_decoders(int8):
    clips = noise_clips([3.0, 7.5, 1.2])
    decoding = Decoding(max_new_tokens=12)
    static = int8.caption_clips(clips, decoding)
    reference = Captioner(int8.thinker, int8.processor, task="caption", prompt=int8.prompt, model_name="tiny",
                          load_s=0.0, decoder="transformers", quant="int8")  # fmt: skip
    assert [r.tokens for r in reference.caption_clips(clips, decoding)] == [12, 12, 12]
    assert [r.text for r in reference.caption_clips(clips, decoding)] == [r.text for r in static]
    assert {r.quant for r in static} == {"int8"}


@pytest.mark.slow
def test_int8_runs_through_the_compiled_decoder(int8):
    """The compiled step traces torchao's int8 weights; in bf16 its logits match the eager step's to rounding."""
    ((ids, embeds),) = int8._prompts([(noise_clips([3.0])[0].samples, int8.chat_text)])
    logits = {}
    with torch.inference_mode():
        for name, backend in (("eager", None), ("compiled", compiler(int8.device)[0])):
            decoder = Decoder(int8.thinker, [len(ids) + 4], backend)
            first = decoder.prefill([0], [embeds])[0]
            logits[name] = decoder.step(first.argmax()[None], torch.tensor([len(ids)]))[0]
    eager, compiled = logits["eager"], logits["compiled"]
    assert float((compiled - eager).norm() / eager.norm()) < 0.02  # bf16 rounding of fused kernels, not a bug
    assert type(text_model(int8.thinker).layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


def test_sides_name_their_quantization():
    assert parse_side("cpu:bf16:int8") == Side("cpu", "bf16", "int8")
    assert parse_side("cuda:0:bf16:int4") == Side("cuda:0", "bf16", "int4")
    assert parse_side("cuda:fp8") == Side("cuda", "auto", "fp8")
    assert parse_side("npu:0:bf16") == Side("npu:0", "bf16", "none")
    assert str(Side("cuda", "bf16", "int4")) == "cuda:bf16:int4" and str(Side("cpu", "fp32")) == "cpu:fp32"
    with pytest.raises(ValueError, match="DEVICE"):
        parse_side("int8")


@pytest.mark.slow
def test_int8_changes_what_bf16_computes_and_does_so_the_same_every_time(tiny_model):
    clips = noise_clips([4.0])
    decoding = Decoding(max_new_tokens=8)
    against_bf16, _ = compare(tiny_model, Side("cpu", "bf16"), Side("cpu", "bf16", "int8"), clips, decoding)
    against_itself, _ = compare(tiny_model, Side("cpu", "bf16", "int8"), Side("cpu", "bf16", "int8"), clips, decoding)
    assert against_bf16[0]["teacher_forced"]["kl_mean"] > 0
    assert against_itself[0]["teacher_forced"]["kl_max"] == 0.0
    encoder = [layer for layer in against_bf16[0]["layers"] if layer["name"].startswith("encoder.")]
    llm = [layer for layer in against_bf16[0]["layers"] if layer["name"].startswith("llm.")]
    assert all(layer["cosine"] == 1.0 for layer in encoder)  # the audio encoder is not quantized
    assert all(layer["cosine"] < 1.0 for layer in llm)


@pytest.mark.slow
def test_compare_fp32_against_bf16_int8_reports_kl_top1_and_layer_cosines(tiny_model, tmp_path):
    out = tmp_path / "precision"
    done = run_acecap("compare", "--model", str(tiny_model), "--ref", "cpu:fp32", "--cand", "cpu:bf16:int8",
                      "--max-new-tokens", "8", "-o", str(out))  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    assert "(cpu:bf16:int8 against cpu:fp32)" in done.stderr
    document = json.loads((out / "precision_results.json").read_text())
    assert document["candidate"] == "cpu:bf16:int8" and len(document["clips"]) == 8
    for clip in document["clips"]:
        forced = clip["teacher_forced"]
        assert 0 <= forced["top1_agreement"] <= 1 and forced["kl_mean"] > 0
        assert len(forced["kl_per_step"]) == len(clip["generation"]["reference_ids"])
        names = [layer["name"] for layer in clip["layers"]]
        assert names == [f"encoder.{i}" for i in range(2)] + [f"llm.{i}" for i in range(2)]
        assert all(0.9 < layer["cosine"] <= 1.0 for layer in clip["layers"])
    report = (out / "report.md").read_text()
    assert "KL" in report and "cosine" in report


@pytest.mark.slow
def test_a_prequantized_folder_loads_as_it_was_made(tiny_model, int8, tmp_path):
    folder = tmp_path / "tiny-int8"
    done = run_acecap("quantize", str(tiny_model), "-o", str(folder), "--quant", "int8", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "Enum subclass" not in done.stderr  # torchao's import-time deprecation warnings under torch 2.14
    assert json.loads((folder / "quantization.json").read_text())["quant"] == "int8"
    assert {"tokenizer.json", "preprocessor_config.json", "chat_template.json", "config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.safetensors"))
    loaded = Captioner.from_pretrained(folder, device="cpu")  # no --quant: the folder says int8
    assert loaded.quant == "int8" and loaded.dtype == torch.bfloat16
    ours_state, theirs_state = loaded.thinker.state_dict(), int8.thinker.state_dict()
    assert list(ours_state) == list(theirs_state)
    for (name, ours), theirs in zip(ours_state.items(), theirs_state.values(), strict=True):
        if type(ours).__name__ == "Int8Tensor":
            assert torch.equal(ours.qdata, theirs.qdata) and torch.equal(ours.scale, theirs.scale), name
        else:
            assert torch.equal(ours, theirs), name
    clips = noise_clips([3.0, 5.0])
    decoding = Decoding(max_new_tokens=10)
    texts = [r.text for r in loaded.caption_clips(clips, decoding)]
    assert texts == [r.text for r in int8.caption_clips(clips, decoding)]
    with pytest.raises(QuantError, match="holds int8 weights"):
        Captioner.from_pretrained(folder, device="cpu", quant="int4")
    with pytest.raises(QuantError, match="bf16"):
        Captioner.from_pretrained(folder, device="cpu", dtype="fp32")
    again = run_acecap("quantize", str(folder), "-o", str(tmp_path / "again"), "--quant", "int4", "--device", "cpu")
    assert again.returncode == 2 and "already quantized" in again.stderr


@pytest.mark.slow
def test_an_int4_folder_made_on_the_cpu_loads_in_a_new_process(tiny_model, tmp_path):
    """int4 on the CPU is a torchao prototype class that only quantizing imports: loading must import it too."""
    (tmp_path / "taken").write_text("a file where the folder should go")
    refused = run_acecap("quantize", str(tiny_model), "-o", str(tmp_path / "taken"), "--quant", "int4")
    assert refused.returncode == 2 and "is a file" in refused.stderr and "Loading" not in refused.stderr
    folder = tmp_path / "tiny-int4"
    assert run_acecap("quantize", str(tiny_model), "-o", str(folder), "--quant", "int4").returncode == 0
    soundfile.write(tmp_path / "song.wav", noise_clips([2.0])[0].samples, 16000)
    result = run_acecap("caption", str(tmp_path / "song.wav"), "--model", str(folder), "--max-new-tokens", "3")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_quantizations_that_cannot_run_are_refused_before_loading(tiny_model):
    cpu = torch.device("cpu")
    with pytest.raises(QuantError, match="computes in bf16"):
        check("int4", cpu, torch.float32)
    with pytest.raises(QuantError, match="runs on cpu and cuda"):
        check("int8", torch.device("mps"), torch.bfloat16)
    done = run_acecap("caption", "x.wav", "--model", str(tiny_model), "--quant", "int3")
    assert done.returncode == 2 and "invalid choice: 'int3'" in done.stderr


@pytest.mark.slow
def test_without_torchao_the_error_says_what_to_install_before_any_download(audio_dir):
    hide = "import sys; sys.modules['torchao'] = None; from acecap.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", hide, "caption", str(audio_dir / "tone.wav"), "--model", "ACE-Step/acestep-captioner",
         "--device", "cpu", "--quant", "int8"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert "--quant int8 needs torchao: pip install 'acecap[quant]'" in done.stderr  # not "model not found"


@pytest.mark.slow
def test_bench_measures_quantized_weights(tmp_path):
    from acecap.bench import bench

    report = bench(shape="tiny", device="cpu", quant="int4", decoders=["static"], batch_sizes=[1], seconds=1.0,
                   tokens=3, repeats=1, output_dir=tmp_path, log=lambda line: None)  # fmt: skip
    setup, (run,) = report["setup"], report["runs"]
    assert setup["quant"] == "int4" and setup["dtype"] == "bf16" and run["error"] is None
    assert setup["weight_bytes"] == resident_bytes(thinker_shapes("tiny"), "int4", torch.bfloat16)
    assert f"int4 weights, {setup['weight_bytes'] / GiB:.1f} GiB" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_the_load_benchmark_loads_both_ways(tiny_model, tmp_path):
    from test_benchmarks import load_program

    report = load_program("quant_load").main([str(tiny_model), "--quant", "int8", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "quant-load-int8-cpu.json").read_text())
    assert report["quantize at load"]["quant"] == report["pre-quantized folder"]["quant"] == "int8"
    assert (tmp_path / f"{tiny_model.name}-int8" / "quantized.pt").is_file()
