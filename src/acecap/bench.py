"""acecap bench: what the seed measured (one clip, one card) and what a dataset job needs (batches).

Random weights in a given shape run at the speed of real weights in that shape, so `--shapes 7b` measures
the real model's speed without a download. Every point decodes exactly `--tokens` tokens (end token
ignored), after a warm-up, with the device synchronised around each timed call.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import devices
from .audio import SAMPLE_RATE, Clip
from .captioner import AUDIO_TOKENS_PER_SECOND, Captioner
from .decode import PREFILL_TOKENS, cache_bytes_per_token, choose_decoder
from .features import audio_tokens, feature_frames
from .generate import Decoding
from .plotting import label, pyplot
from .quant import quantize_layer, tensor_bytes
from .writers import check_writable

# Memory bandwidth (bytes/s) of the cards whose peak we know, matched on the device name.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "910B": 1.6e12}
# Dense bf16 matrix throughput (FLOP/s, without 2:4 sparsity), matched on the device name, first match wins.
# NVIDIA's datasheets: H200 SXM and H100 SXM 989 TFLOP/s (1,979 "with sparsity"), H200 NVL 835, H100 PCIe
# 756, A100 312. Ascend 910B: ~320 TFLOP/s fp16, as reported by third parties (not a Huawei datasheet);
# its bf16 runs on the same cube units.
PEAK_BF16_FLOPS = {
    "H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "910B": 320e12,
}  # fmt: skip


@dataclass
class Point:
    """One decoder at one batch size: the figures of `repeats` timed calls."""

    decoder: str
    batch: int
    seconds: float  # audio per clip
    tokens: int  # decoded per clip
    first_token_s: list[float]  # per timed call: audio features + prefill, for the whole batch
    total_s: list[float]  # per timed call
    peak_memory_bytes: int  # on the CPU: resident memory above what the process held before the model
    step_bytes: int  # weights + KV cache read by one decode step (estimate)
    prefill_flops: float = 0.0  # the batch's prefill: audio encoder and language model (prefill_flops)
    error: str | None = None

    @property
    def decode_s(self) -> float:
        return statistics.mean(t - f for t, f in zip(self.total_s, self.first_token_s, strict=True))

    def figures(self, peak_bandwidth: float | None, peak_flops: float | None = None) -> dict:
        """Rates derived from the raw timings; every one is a count over a measured time."""
        if self.error:
            return {}
        total = statistics.mean(self.total_s)
        step_s = self.decode_s / (self.tokens - 1) if self.tokens > 1 else float("nan")
        ttft = sorted(self.first_token_s)
        bandwidth = self.step_bytes / step_s if self.tokens > 1 else float("nan")
        return {
            "ttft_mean_s": statistics.mean(ttft),
            "ttft_min_s": ttft[0],  # a few repeats: their range, not percentiles they cannot support
            "ttft_max_s": ttft[-1],
            "step_ms": step_s * 1000,
            "decode_tok_s_per_stream": 1 / step_s,
            "decode_tok_s": self.batch / step_s,
            "output_tok_s": self.batch * self.tokens / total,
            "requests_per_s": self.batch / total,
            "audio_s_per_s": self.batch * self.seconds / total,
            "bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_share": bandwidth / peak_bandwidth if peak_bandwidth else None,
            # Time to first token holds features, encoder and prefill of the whole batch.
            "prefill_tflop_s": self.prefill_flops / statistics.mean(ttft) / 1e12,
            "prefill_peak_share": self.prefill_flops / statistics.mean(ttft) / peak_flops if peak_flops else None,
        }


def peak_bandwidth(name: str) -> float | None:
    return next((value for key, value in PEAK_BANDWIDTH.items() if key in name), None)


def peak_flops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def prefill_flops(thinker, prompt_tokens: int, samples: int) -> dict[str, float]:
    """Matrix FLOPs of one clip's prefill: the audio encoder over its frames and the language model over its
    prompt, each 2 per weight per token, plus attention (the encoder's within 2 s windows; the language
    model's causal, so only the lower triangle counts), plus the output head on the last token."""
    from .compat import text_model, thinker_parts
    from .features import feature_frames

    text, tower = text_model(thinker), thinker_parts(thinker).audio_tower
    config = text.config
    width = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    layer_weights = sum(p.numel() for p in text.layers.parameters())
    language = 2 * layer_weights * prompt_tokens + 2 * prompt_tokens**2 * width * len(text.layers)
    language += 2 * thinker.lm_head.weight.numel()
    frames = feature_frames(samples)
    window = 2 * tower.n_window
    windows = [min(window, frames - start) for start in range(0, frames, window)]
    tokens = [(length - 1) // 2 + 1 for length in windows]  # after the stride-2 convolution
    encoder_weights = sum(p.numel() for p in tower.layers.parameters())
    d_model = tower.conv2.out_channels
    encoder = 2 * tower.conv1.weight.numel() * frames + 2 * tower.conv2.weight.numel() * sum(tokens)
    encoder += 2 * encoder_weights * sum(tokens) + sum(4 * n * n * d_model for n in tokens) * len(tower.layers)
    encoder += 2 * tower.proj.weight.numel() * (sum(tokens) // 2)
    return {"language_model": float(language), "audio_encoder": float(encoder)}


def step_bytes(thinker, rows: int, context: int) -> int:
    """Bytes one decode step must read: the language model's weights as stored (quantized or not; the embedding
    table is only indexed) and each row's KV cache over `context` tokens."""
    from .compat import text_model

    text = text_model(thinker)
    weights = sum(tensor_bytes(p) for p in text.parameters()) - tensor_bytes(text.embed_tokens.weight)
    weights += tensor_bytes(thinker.lm_head.weight)
    return weights + rows * context * cache_bytes_per_token(thinker)


def tone_clip(seconds: float, seed: int = 0) -> Clip:
    """Chord tones with vibrato and a little noise at 16 kHz: audio-like input of exactly `seconds`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    root = rng.uniform(110, 330)
    tone = sum(np.sin(2 * np.pi * root * r * t + 0.3 * np.sin(2 * np.pi * 5 * t)) for r in (1, 1.25, 1.5))
    samples = 0.07 * tone + 0.01 * rng.standard_normal(len(t))
    return Clip(samples.astype(np.float32), f"tone-{seconds:g}s-{seed}")


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where a benchmark program ran: machine, device, dtype and library versions, for its report."""
    import transformers

    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        "device": f"{devices.device_name(device)} ({device})",
        "dtype": devices.dtype_name(dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def random_captioner(
    shape: str, device: str, dtype: str, quant: str = "none", prefill_tokens: int = PREFILL_TOKENS
) -> Captioner:
    """A Captioner over random weights of `shape`, built on the device; tokenizer and processor are real."""
    from . import quant as quantization
    from .model import load_processor
    from .tiny import random_thinker, write_tiny

    torch_device = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype("bf16" if quant != "none" and dtype == "auto" else dtype, torch_device)
    quantization.check(quant, torch_device, torch_dtype)
    with tempfile.TemporaryDirectory(prefix="acecap-bench-") as folder:
        processor = load_processor(write_tiny(folder))  # the tiny folder's tokenizer and processor are real
    start = time.perf_counter()
    if quant == "none":
        thinker = random_thinker(shape, torch_device, torch_dtype)
    else:
        thinker = random_quantized_thinker(shape, torch_device, quant)
    load_s = devices.now(torch_device) - start
    return Captioner(
        thinker,
        processor,
        task="caption",
        prompt="*Task* Describe this audio in detail",
        model_name=f"random {shape}",
        load_s=load_s,
        quant=quant,
        prefill_tokens=prefill_tokens,
    )


def random_quantized_thinker(shape: str, device: torch.device, quant: str, seed: int = 0):
    """An AudioThinker of `shape` with random bf16 weights, quantized as `quant`, built one decoder layer at a time
    on `device`, so that neither the device nor the host ever holds the 16-bit model."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5OmniThinkerConfig

    from .compat import text_model
    from .model import AudioThinker
    from .tiny import full_config

    config = Qwen2_5OmniThinkerConfig(**full_config(shape)["thinker_config"])
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # buffers as random_thinker makes them
    try:
        with init_empty_weights():  # parameters on the meta device; buffers real
            thinker = AudioThinker(config).eval()
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator(device).manual_seed(seed)
    for layer in text_model(thinker).layers:
        _fill(layer, device, config.initializer_range, generator)
        quantize_layer(layer, quant)
        devices.release_host_memory()
    _fill(thinker, device, config.initializer_range, generator)  # the rest: audio encoder, embeddings, head
    return thinker.to(device)


def _fill(root: torch.nn.Module, device: torch.device, std: float, generator: torch.Generator) -> None:
    """Give every parameter still on the meta device random bf16 values on `device`, as the model's own
    initialisation does: weights normal(0, std), norm scales one, biases zero."""
    for module in root.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
            if name == "bias":
                value.zero_()
            elif value.ndim == 1:
                value.fill_(1.0)
            else:
                value.normal_(0.0, std, generator=generator)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))


def measure(captioner: Captioner, batch: int, seconds: float, tokens: int, repeats: int, baseline: int = 0) -> Point:
    """Warm up, then time `repeats` batches of `batch` clips of `seconds`, each decoding `tokens` tokens.

    `baseline`: on the CPU, the resident bytes before the model was loaded (the interpreter and libraries),
    left out of the peak so that it holds the weights and the work, as a card's allocator peak does."""
    device = captioner.device
    clips = [tone_clip(seconds, seed) for seed in range(batch)]
    decoding = Decoding(max_new_tokens=tokens, ignore_eos=True)
    context = captioner.prompt_tokens + int(seconds * AUDIO_TOKENS_PER_SECOND) + tokens // 2
    point = Point(captioner.decoder, batch, seconds, tokens, [], [], 0, step_bytes(captioner.thinker, batch, context))
    samples = len(clips[0].samples)
    prompt = captioner.prompt_tokens - 1 + audio_tokens(feature_frames(samples))  # the placeholder expanded
    point.prefill_flops = batch * sum(prefill_flops(captioner.thinker, prompt, samples).values())
    try:
        warm_up = Decoding(max_new_tokens=min(tokens, 8), ignore_eos=True)
        captioner.caption_clips(clips, warm_up, max_duration=seconds)  # the whole clip, not the default 300 s
        devices.reset_peak_memory(device)
        for _ in range(repeats):
            result = captioner.caption_clips(clips, decoding, max_duration=seconds)[0]
            point.first_token_s.append(result.timings.first_token_s)
            point.total_s.append(result.timings.total_s)
        point.peak_memory_bytes = devices.peak_memory(device) - (baseline if device.type == "cpu" else 0)
    except Exception as error:  # one failing point (out of memory, say) must not lose the others
        point.error = f"{type(error).__name__}: {error}"
    finally:
        devices.empty_cache(device)
    return point


TABLE_HEAD = (
    "| decoder | batch | input audio (s) | TTFT mean / min / max (ms) | decode tok/s per stream | "
    "output tok/s | req/s | audio-s/s | peak memory (GiB) | bandwidth (GB/s, share of peak) | "
    "prefill TFLOP/s (share of bf16 peak) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
)


def row(run: dict) -> str:
    """One point as a row of the Markdown table."""
    if run.get("error"):
        return f"| {run['decoder']} | {run['batch']} | {run['seconds']:g} | failed: {run['error']} |"
    share = f", {run['bandwidth_share']:.0%}" if run.get("bandwidth_share") is not None else ""
    flops = f", {run['prefill_peak_share']:.0%}" if run.get("prefill_peak_share") is not None else ""
    return (
        f"| {run['decoder']} | {run['batch']} | {run['seconds']:g} | {run['ttft_mean_s'] * 1000:.0f} / "
        f"{run['ttft_min_s'] * 1000:.0f} / {run['ttft_max_s'] * 1000:.0f} | "
        f"{run['decode_tok_s_per_stream']:.1f} | {run['output_tok_s']:.1f} | {run['requests_per_s']:.3f} | "
        f"{run['audio_s_per_s']:.1f} | {run['peak_memory_bytes'] / 2**30:.1f} | "
        f"{run['bandwidth_gb_s']:.0f}{share} | {run['prefill_tflop_s']:.1f}{flops} |"
    )


def quant_words(setup: dict) -> str:
    """How the weights were held, for the report: e.g. "int4 weights, 5.3 GiB"."""
    quant = setup.get("quant", "none")
    held = f"{quant} weights" if quant != "none" else f"{setup['dtype']} weights"
    return f"{held}, {setup['weight_bytes'] / 2**30:.1f} GiB" if "weight_bytes" in setup else held


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Device: {setup['device_name']} ({setup['device']}, {setup['dtype']}); model: {setup['model']} "
        f"({setup['parameters'] / 1e9:.2f} B thinker parameters, {quant_words(setup)}, loaded in "
        f"{setup['load_s']:.1f} s); "
        f"torch {setup['torch']}, transformers {setup['transformers']}.",
        f"Each clip: {setup['seconds']:g} s of audio, {setup['tokens']} tokens decoded (end token ignored); "
        f"{setup['repeats']} timed calls per point after a warm-up.",
        "",
        *TABLE_HEAD,
    ]
    lines += [row(run) for run in report["runs"]]
    lines += [
        "",
        "Prefill TFLOP/s: the batch's audio-encoder and language-model matrix FLOPs (2 per weight per token, "
        "attention causal) over its time to first token, which also holds the features.",
    ]
    if setup["device"] == "cpu":
        lines += ["", "Peak memory on the CPU: resident memory above what the process held before loading the model."]
    if setup["peak_bandwidth"] is None:
        lines += ["", "Peak memory bandwidth of this device unknown: no roofline share."]
    if setup.get("peak_bf16_flops") is None:
        lines += ["", "Peak bf16 FLOP/s of this device unknown: no prefill share."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Output tokens per second against batch size, one line per decoder."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for decoder in dict.fromkeys(run["decoder"] for run in report["runs"]):
        runs = [r for r in report["runs"] if r["decoder"] == decoder and not r.get("error")]
        if runs:
            axes.plot([r["batch"] for r in runs], [r["output_tok_s"] for r in runs], marker="o", label=decoder)
    setup = report["setup"]
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size (clips)")
    axes.set_ylabel("output tokens / s")
    axes.set_title(
        label(f"{setup['model']} on {setup['device_name']} ({setup['dtype']}), {setup['seconds']:g} s clips")
    )
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "bench.md").write_text(markdown(report) + "\n")
    plot(report, folder / "bench.png")


def bench(
    *,
    model: str | None = None,
    shape: str | None = "tiny",
    device: str = "auto",
    dtype: str = "auto",
    quant: str = "none",
    decoders: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    seconds: float = 30.0,
    tokens: int = 128,
    repeats: int = 3,
    prefill_tokens: int = PREFILL_TOKENS,
    output_dir: Path | None = None,
    log=print,
) -> dict:
    """Run every decoder at every batch size; write bench.json and bench.md into `output_dir`."""
    import transformers

    if tokens < 2 or repeats < 1:
        raise ValueError("bench needs --tokens >= 2 and --repeats >= 1")
    if not 0 < seconds < math.inf:
        raise ValueError(f"--seconds {seconds:g}: give a clip length in seconds above 0")
    chosen = [choose_decoder(d, devices.resolve_device(device)) for d in decoders or ["auto"]]  # before loading
    if output_dir:
        check_writable(Path(output_dir))
    batch_sizes = batch_sizes or [1, 8]
    before_model = devices.resident_memory()
    if model:
        captioner = Captioner.from_pretrained(
            model, device=device, dtype=dtype, quant=quant, prefill_tokens=prefill_tokens
        )
    else:
        captioner = random_captioner(shape, device, dtype, quant, prefill_tokens)
    longest = captioner.max_duration_limit(Decoding(max_new_tokens=tokens))
    if seconds > longest:  # it would caption less than the report says it measured
        raise ValueError(f"--seconds {seconds:g}: with --tokens {tokens} this model takes at most {longest:.0f} s "
                         "of audio in one pass")  # fmt: skip
    name = devices.device_name(captioner.device)
    setup = {
        "model": model or f"random weights, {shape} shape",
        "device": str(captioner.device),
        "device_name": name,
        "dtype": devices.dtype_name(captioner.dtype),
        "quant": captioner.quant,
        "parameters": sum(p.numel() for p in captioner.thinker.parameters()),
        "weight_bytes": sum(tensor_bytes(p) for p in captioner.thinker.parameters()),  # as held, quantized or not
        "load_s": captioner.load_s,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "seconds": seconds,
        "tokens": tokens,
        "repeats": repeats,
        "peak_bandwidth": peak_bandwidth(name),
        "peak_bf16_flops": peak_flops(name),
        "prefill_tokens": prefill_tokens,
    }
    report = {"setup": setup, "runs": []}
    for line in TABLE_HEAD:
        log(line)
    for decoder in chosen:
        captioner.decoder = decoder
        for batch in batch_sizes:
            point = measure(captioner, batch, seconds, tokens, repeats, before_model)
            run = {**asdict(point), **point.figures(setup["peak_bandwidth"], setup["peak_bf16_flops"])}
            report["runs"].append(run)
            log(row(run))
            if output_dir:  # after every point, so that a run cut short keeps what it measured
                write_report(report, Path(output_dir))
    return report
