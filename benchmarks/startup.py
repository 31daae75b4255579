"""How fast the command line answers: `acecap --version`, `acecap annotate --help` and a usage error.

Each command runs --repeats times in a fresh process, as a user types it; the report gives the wall time of
each run, their median and worst. Nothing here may import torch or transformers: those load only when a
command does real work.

    python benchmarks/startup.py                  # 10 runs each, reports into benchmarks/results
    python benchmarks/startup.py --repeats 3 -o /tmp/startup

Writes startup.json and startup.md into -o.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "acecap --version": ["--version"],
    "acecap annotate --help": ["annotate", "--help"],
    "acecap annotate (usage error)": ["annotate"],
}
BUDGET_S = 1.0  # issue 18: --version and --help answer within a second


def time_command(args: list[str]) -> float:
    """Wall seconds of one `python -m acecap ARGS` in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "acecap", *args], capture_output=True, check=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("-o", "--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    runs = []
    for name, command in COMMANDS.items():
        times = [time_command(command) for _ in range(args.repeats)]
        runs.append({"command": name, "times_s": times, "median_s": statistics.median(times), "max_s": max(times),
                     "within_budget": max(times) <= BUDGET_S})  # fmt: skip
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "budget_s": BUDGET_S,
        "runs": runs,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| command | median (s) | worst (s) | within 1 s |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r['command']}` | {r['median_s']:.3f} | {r['max_s']:.3f} | {'yes' if r['within_budget'] else 'no'} |"
              for r in runs]  # fmt: skip
    (args.output_dir / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
