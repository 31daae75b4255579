"""Resident memory per quantization: the thinker built in a given shape, measured, not estimated.

Each quantization is built in a fresh process with random weights, one decoder layer at a time (the 16-bit
model is never whole in memory, as `--quant` loads it), and measured three ways: the bytes of every tensor
it holds (torchao's inner tensors counted), the figure acecap computes from the checkpoint's tensor shapes
(what `acecap doctor` and the fit check use), and the process's resident memory (RSS) before and after.
With --steps N it then times N decode steps of the static decoder at batch 1 on one thread: CPU seconds per
step (process time, which other work on the machine barely changes) and wall time.

    python benchmarks/quant.py --shape 7b -o benchmarks/results            # ~10 GB of RAM at most (int8)
    python benchmarks/quant.py --shape small --quants none,int8,int4,fp8 --steps 16 -o benchmarks/results

Writes quant-memory-<shape>-<device>.json and .md into -o. `none` (bf16) needs the whole 16-bit model
in memory (16.5 GB for 7b): leave it out where memory is short.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from acecap import devices
from acecap.bench import environment, random_quantized_thinker
from acecap.compat import text_model
from acecap.decode import Decoder
from acecap.doctor import thinker_shapes
from acecap.quant import model_bytes, resident_bytes, tensor_bytes
from acecap.tiny import random_thinker

GiB = 2**30


def rss() -> int:
    """This process's resident memory now, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024


def step_times(thinker, steps: int, prompt: int = 256) -> tuple[float, float]:
    """CPU seconds and wall seconds per decode step at batch 1, on one thread, after a `prompt`-token prefill."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, thinker.config.text_config.vocab_size, (prompt,), generator=generator)
    with torch.inference_mode():
        decoder = Decoder(thinker, [prompt + steps + 2])
        decoder.prefill([0], [text_model(thinker).embed_tokens(ids)])
        token, lengths = ids[:1], torch.tensor([prompt])
        decoder.step(token, lengths)  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for step in range(1, steps + 1):
            decoder.step(token, lengths + step)
        return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def measure(shape: str, quant: str, device: torch.device, steps: int = 0) -> dict:
    """Build one quantization of the thinker and measure what it holds."""
    before = rss()
    start = time.perf_counter()
    if quant == "none":
        thinker = random_thinker(shape, device, torch.bfloat16)
    else:
        thinker = random_quantized_thinker(shape, device, quant)
    build_s = devices.now(device) - start
    weights = sum(tensor_bytes(p) for p in thinker.parameters())
    after = rss()
    step_cpu_s, step_wall_s = step_times(thinker, steps) if steps else (None, None)
    return {
        "quant": quant,
        "weight_bytes": weights,
        "buffer_bytes": model_bytes(thinker) - weights,
        "computed_bytes": resident_bytes(thinker_shapes(shape), quant, torch.bfloat16, device.type),
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
        "build_s": build_s,
        "step_cpu_s": step_cpu_s,  # one thread, batch 1
        "step_wall_s": step_wall_s,
    }


def markdown(report: dict) -> str:
    setup, bf16 = report["setup"], report["bf16_weight_bytes"]
    lines = [
        f"The {setup['shape']} thinker ({setup['parameters'] / 1e9:.2f} B parameters) on {setup['device']}; "
        f"torch {setup['torch']}, torchao {setup['torchao']}. One process per row.",
        "",
        "| quant | weights held (GiB, every tensor) | computed from the shapes (GiB) | share of bf16 | "
        "process RSS after build (GiB) | peak RSS (GiB) | build (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['quant']} | {row['weight_bytes'] / GiB:.2f} | {row['computed_bytes'] / GiB:.2f} | "
            f"{row['weight_bytes'] / bf16:.0%} | {row['rss_after_bytes'] / GiB:.2f} | "
            f"{row['peak_rss_bytes'] / GiB:.2f} | {row['build_s']:.0f} |"
        )
    timed = [row for row in report["rows"] if row["step_cpu_s"] is not None]
    if timed:
        base = next((row["step_cpu_s"] for row in timed if row["quant"] == "none"), None)
        lines += [
            "",
            "| quant | decode step, CPU ms (1 thread, batch 1) | tok/s at that | CPU time against bf16 | wall ms |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in timed:
            ratio = f"{row['step_cpu_s'] / base:.2f}×" if base else "-"
            lines.append(
                f"| {row['quant']} | {row['step_cpu_s'] * 1000:.1f} | {1 / row['step_cpu_s']:.1f} | {ratio} | "
                f"{row['step_wall_s'] * 1000:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "small", "7b"], default="7b")
    parser.add_argument("--quants", default="int8,int4,fp8", help="comma list of none, int8, int4, fp8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=0, help="also time this many decode steps per quant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this quant, print JSON
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = devices.resolve_device(args.device)
    if args.one:
        print(json.dumps(measure(args.shape, args.one, device, args.steps)))
        return {}
    rows = []
    for quant in args.quants.split(","):
        command = [sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--one", quant,
                   "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{quant}: {rows[-1]['weight_bytes'] / GiB:.2f} GiB", file=sys.stderr)
    from importlib.metadata import version

    shapes = thinker_shapes(args.shape)
    setup = {
        **environment(device, torch.bfloat16),
        "shape": args.shape,
        "parameters": sum(torch.Size(shape).numel() for _, shape in shapes),
        "torchao": version("torchao"),
    }
    report = {"setup": setup, "bf16_weight_bytes": resident_bytes(shapes, "none", torch.bfloat16), "rows": rows}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = f"quant-memory-{args.shape}-{device.type}"
    (args.output_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / f"{name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
