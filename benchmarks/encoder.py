"""Audio encoder time: transformers' own call against acecap's, on the installed transformers line.

transformers 4.57 builds one dense attention mask over every 2 s window of a call, so its encoder time
and memory grow with the square of a batch's audio; 5.x runs attention window by window (~90 calls per
layer for a 3-minute clip). acecap (`encoder.py`) stacks every window of the batch and runs each layer's
attention as one call. Each case is timed once after a warm-up call; the rows must agree.

    python benchmarks/encoder.py                                   # small shape, CPU
    python benchmarks/encoder.py --shape tiny --cases 2x3 -o /tmp/enc   # smoke run

Writes encoder-<transformers version>.json and .md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from acecap import Captioner, compat, devices
from acecap.encoder import encode_audio
from acecap.tiny import write_tiny


def timed(call) -> tuple[float, torch.Tensor]:
    call()  # warm-up
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, getattr(out, "last_hidden_state", out)


def encode_case(captioner: Captioner, clips: int, seconds: float, seed: int = 0) -> dict:
    noise = np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    row = captioner._features([noise])
    features = row["input_features"].repeat(clips, 1, 1)
    mask = row["feature_attention_mask"].repeat(clips, 1)
    thinker = captioner.thinker
    tower = compat.thinker_parts(thinker).audio_tower
    frames = mask.sum(dim=1).tolist()
    with torch.inference_mode():
        library_s, expected = timed(lambda: thinker.get_audio_features(features, feature_attention_mask=mask))
        acecap_s, rows_out = timed(lambda: encode_audio(tower, features, frames))
    return {
        "clips": clips,
        "seconds": seconds,
        "rows": rows_out.shape[0],
        "max_difference": float((rows_out.float() - expected.float()).abs().max()),
        "transformers_s": library_s,
        "acecap_s": acecap_s,
        "speedup": library_s / acecap_s,
    }


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Audio encoder, {setup['shape']} shape, {setup['device']}, {setup['dtype']}, "
        f"transformers {setup['transformers']}, torch {setup['torch']} ({setup['machine']})",
        "",
        "| batch | transformers' call | acecap | speed-up | largest difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in report["cases"]:
        lines.append(
            f"| {case['clips']} × {case['seconds']:g} s | {case['transformers_s']:.2f} s | {case['acecap_s']:.2f} s "
            f"| {case['speedup']:.1f}× | {case['max_difference']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "7b"], help="random model shape")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, npu, …")
    parser.add_argument("--cases", nargs="+", default=["8x30", "8x120", "1x300"], help="CLIPSxSECONDS each")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import transformers

    device = devices.resolve_device(args.device)
    report = {
        "setup": {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "device": f"{devices.device_name(device)} ({device})",
            "dtype": devices.dtype_name(devices.resolve_dtype("auto", device)),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "shape": args.shape,
        },
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="acecap-bench-") as scratch:
        model = write_tiny(Path(scratch) / "model", shape=args.shape, device=str(device))
        captioner = Captioner.from_pretrained(model, device=str(device))
        for case in args.cases:
            clips, seconds = case.split("x")
            report["cases"].append(encode_case(captioner, int(clips), float(seconds)))
            print(markdown(report).splitlines()[-1], flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = f"encoder-{transformers.__version__}"
    (args.output_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / f"{name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
