"""The annotate benchmark: the seed's pipeline against `acecap annotate`, same model, same clips, one process.

(a) seed: one clip per `generate`, the processor's default padding of every clip to 300 s.
(b) acecap: `annotate()` as the command line runs it: decode processes, features on the device, packed
    prefill, continuous batching; once per decoder in --decoders (a compiled decoder's compile time counts:
    it is part of the job).
All decode exactly --tokens tokens per clip (end token ignored) with greedy search, so they do the same
work. Model loading is timed apart and left out of the rates.

    python benchmarks/annotate.py                                    # small shape, 32 clips of 5–240 s
    python benchmarks/annotate.py --dtype bf16 --decoders static,compiled   # seed, eager and compiled
    python benchmarks/annotate.py --shape tiny --clips 3 --longest 3 --tokens 4 -o /tmp/bench  # smoke run

Writes annotate.json and annotate.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from acecap import Decoding, devices
from acecap.annotate import Job, annotate
from acecap.audio import load_audio
from acecap.bench import environment
from acecap.decode import DECODERS, choose_decoder
from acecap.model import TASKS, load_processor, load_thinker, render_prompt, resident_parameters
from acecap.tiny import write_tiny


def clip_lengths(count: int, shortest: float, longest: float) -> list[float]:
    """Lengths spaced evenly on a log scale: as many short clips as long ones, per factor of length."""
    return [float(x) for x in np.round(np.geomspace(shortest, longest, count), 1)]


def write_clips(folder: Path, lengths: list[float], seed: int = 0) -> list[Path]:
    """Music-like test material: a few chord tones with vibrato and a little noise, at 44.1 kHz stereo."""
    rng = np.random.default_rng(seed)
    paths = []
    for index, seconds in enumerate(lengths):
        t = np.arange(int(seconds * 44100)) / 44100
        root = rng.uniform(110, 330)
        tone = sum(np.sin(2 * np.pi * root * ratio * t + 0.3 * np.sin(2 * np.pi * 5 * t)) for ratio in (1, 1.25, 1.5))
        mono = 0.2 * tone / 3 + 0.01 * rng.standard_normal(len(t))
        path = folder / f"clip{index:02d}.wav"
        soundfile.write(path, np.stack([mono, mono], axis=1).astype(np.float32), 44100)
        paths.append(path)
    return paths


def seed_pipeline(model: Path, paths: list[Path], tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One clip per generate call, features padded to 300 s: what the seed's inference script does."""
    start = time.perf_counter()
    thinker = load_thinker(model, device, dtype)
    processor = load_processor(model)
    load_s = time.perf_counter() - start
    text = render_prompt(processor, TASKS["caption"].prompt)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = time.perf_counter()
    audio_seconds = 0.0
    for path in paths:
        clip = load_audio(path)
        audio_seconds += clip.duration
        inputs = processor(text=[text], audio=[clip.samples], padding=True, return_tensors="pt")  # 300 s padding
        inputs = inputs.to(device)
        inputs["input_features"] = inputs["input_features"].to(dtype)
        with torch.inference_mode():
            thinker.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=end)
    wall_s = devices.now(device) - start
    return rates("seed pipeline", len(paths), audio_seconds, wall_s, load_s)


def acecap_annotate(
    model: Path, folder: Path, output: Path, tokens: int, batch_size: int | None, decoder: str, device: torch.device,
    dtype: torch.dtype,
) -> dict:  # fmt: skip
    job = Job(
        inputs=[str(folder)],
        output_dir=output,
        model=str(model),
        devices=[str(device)],
        dtype=devices.dtype_name(dtype),
        decoder=decoder,
        decoding=Decoding(max_new_tokens=tokens, ignore_eos=True),
        batch_size=batch_size,
    )
    summary = annotate(job, progress=False)
    if not summary.ok:
        raise RuntimeError(f"annotate failed: {summary.failures}")
    load_s = summary.per_device[0]["load_s"]
    return rates(
        f"acecap annotate ({decoder} decoder)",
        summary.captioned,
        summary.audio_seconds,
        summary.elapsed_s - load_s,
        load_s,
    )


def rates(name: str, files: int, audio_seconds: float, wall_s: float, load_s: float) -> dict:
    """A pipeline's counts over its measured time."""
    return {
        "pipeline": name,
        "files": files,
        "audio_seconds": audio_seconds,
        "wall_s": wall_s,
        "load_s": load_s,
        "audio_seconds_per_s": audio_seconds / wall_s,
        "files_per_min": files / wall_s * 60,
    }


def markdown(report: dict) -> str:
    rows = [
        "| pipeline | files | audio (s) | wall (s, load excluded) | audio-s/s | files/min | × seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side in report["runs"]:
        rows.append(
            f"| {side['pipeline']} | {side['files']} | {side['audio_seconds']:.0f} | {side['wall_s']:.1f} | "
            f"{side['audio_seconds_per_s']:.2f} | {side['files_per_min']:.2f} | {side['speedup']:.2f}× |"
        )
    setup = report["setup"]
    return "\n".join(
        [
            f"Machine: {setup['machine']}; torch {setup['torch']}, transformers {setup['transformers']}.",
            f"Model: random weights, `{setup['shape']}` shape ({setup['parameters'] / 1e6:.0f} M thinker parameters), "
            f"{setup['dtype']} on {setup['device']}; "
            f"{setup['tokens']} tokens decoded per clip; {setup['clips']} clips of "
            f"{setup['shortest']}–{setup['longest']} s (log-spaced lengths).",
            "",
            *rows,
            "",
            "× seed: audio-seconds per second over the seed pipeline's.",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "7b"], help="random model shape")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, npu, …")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="auto: fp32 on cpu, bf16 on accelerators")  # fmt: skip
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--shortest", type=float, default=5.0, help="seconds")
    parser.add_argument("--longest", type=float, default=240.0, help="seconds")
    parser.add_argument("--tokens", type=int, default=200, help="tokens decoded per clip, on both sides")
    parser.add_argument("--batch-size", type=int, help="acecap's batch size (default: acecap's own)")
    parser.add_argument("--decoders", type=lambda text: text.split(","), default=["auto"],
                        help="acecap's decoders, comma-separated, one run each (default auto: graphs on CUDA, "
                             f"else static); of {', '.join(DECODERS)}")  # fmt: skip
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    try:  # every decoder checked before minutes of work: unknown, or not for this device
        args.decoders = [choose_decoder(decoder, device) for decoder in args.decoders]
    except ValueError as error:
        parser.error(str(error))
    lengths = clip_lengths(args.clips, args.shortest, args.longest)
    report = {
        "setup": {
            **environment(device, dtype),
            "shape": args.shape,
            "tokens": args.tokens,
            "decoders": args.decoders,
            "clips": args.clips,
            "shortest": args.shortest,
            "longest": args.longest,
            "lengths": lengths,
        },
        "runs": [],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="acecap-bench-") as scratch:
        scratch = Path(scratch)
        model = write_tiny(scratch / "model", shape=args.shape, device=str(device))
        report["setup"]["parameters"] = resident_parameters(model)
        clips = scratch / "clips"
        clips.mkdir()
        paths = write_clips(clips, lengths)
        # Each side's figures are written as soon as it ends, so that a run cut short keeps them.
        for decoder in args.decoders:
            output = scratch / f"out-{decoder}"
            report["runs"].append(
                acecap_annotate(model, clips, output, args.tokens, args.batch_size, decoder, device, dtype)
            )
            (args.output_dir / "annotate.json").write_text(json.dumps(report, indent=2) + "\n")
        seed = seed_pipeline(model, paths, args.tokens, device, dtype)
        report["runs"].insert(0, seed)
    for run in report["runs"]:
        run["speedup"] = run["audio_seconds_per_s"] / seed["audio_seconds_per_s"]
    (args.output_dir / "annotate.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "annotate.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
