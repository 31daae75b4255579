"""Load time with --quant: quantizing a 16-bit checkpoint as it loads, against the folder `acecap quantize` wrote.

    python -m acecap.tiny /tmp/small --shape small
    python benchmarks/quant_load.py /tmp/small --quant int4 -o benchmarks/results

Writes the pre-quantized folder beside the report (DIR/<checkpoint>-<quant>), then loads both ways in this
process, each timed in wall and CPU seconds. Writes quant-load-<quant>-<device>.json into -o.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from acecap import Captioner, devices
from acecap.bench import environment
from acecap.model import write_quantized


def timed_load(model: Path, quant: str, device: str) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    captioner = Captioner.from_pretrained(model, device=device, quant=quant)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "quant": captioner.quant}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a 16-bit checkpoint folder")
    parser.add_argument("--quant", choices=["int8", "int4", "fp8"], default="int4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = devices.resolve_device(args.device)
    folder = args.output_dir / f"{args.checkpoint.name}-{args.quant}"
    start = time.perf_counter()
    write_quantized(args.checkpoint, folder, args.quant, device)
    report = {
        "setup": {**environment(device, devices.resolve_dtype("bf16", device)), "checkpoint": str(args.checkpoint)},
        "quantize_s": time.perf_counter() - start,
        "quantize at load": timed_load(args.checkpoint, args.quant, args.device),
        "pre-quantized folder": timed_load(folder, "none", args.device),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"quant-load-{args.quant}-{device.type}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
