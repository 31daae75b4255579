"""The input pipeline alone: decoding and resampling in worker processes, then log-mel features in batches,
feeding a consumer that does nothing. On mp3 songs of ~3 minutes (44.1 kHz stereo, as annotate-3min.sh
makes them): songs per second against the number of worker processes, and the CPU each song costs.

    python benchmarks/pipeline.py                                  # 16 songs of 144-216 s, 1 and 2 workers
    python benchmarks/pipeline.py --songs 4 --seconds 10 --workers 1 -o /tmp/p   # smoke run

Writes pipeline.json and pipeline.md into -o (default benchmarks/results). The report says how many CPU
cores keep one device at the goal rate (--goal audio-seconds per second, default 800: issue 17's H200 goal):
the workers' CPU seconds per song times the songs per second the goal needs, plus one core for the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch

from acecap import devices
from acecap.inputs import Item
from acecap.pipeline import Pipeline


def write_song(path: Path, seconds: float, seed: int) -> float:
    """A tone with a sawtooth, pulsing, a little noise, 44.1 kHz stereo mp3 (as annotate-3min.sh)."""
    rng = np.random.default_rng(seed)
    rate = 44100
    t = np.arange(int(rate * seconds * (0.8 + 0.4 * rng.random()))) / rate
    pitch = 110 * 2 ** (rng.integers(0, 12) / 12)
    x = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.2 * ((t * pitch * 1.5) % 1 - 0.5)
    x *= 0.6 + 0.4 * (np.sin(2 * np.pi * 2 * t) > 0)
    x += 0.02 * rng.standard_normal(t.size)
    soundfile.write(path, np.stack([x, np.roll(x, 30)], 1).astype(np.float32), rate, format="MP3")
    return len(t) / rate


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(paths: list[Path], workers: int, batch: int, device: torch.device | None, extractor) -> dict:
    """Decode every song with `workers` processes; features for each `batch` of clips (unless `device` is
    None); nothing else."""
    from acecap.features import LogMel

    log_mel = LogMel(extractor, device) if device is not None else lambda clips: None
    items = [Item(path, Path(path.name)) for path in paths]
    cpu_before, children_before, start = time.process_time(), children_cpu_s(), time.perf_counter()
    audio_seconds, waiting, errors = 0.0, [], 0
    with Pipeline(workers) as pipeline:
        for decoded in pipeline.decode(items, ahead=2 * batch):
            if decoded.clip is None:
                errors += 1
                continue
            audio_seconds += decoded.clip.duration
            waiting.append(decoded.clip.samples)
            if len(waiting) == batch:
                log_mel(waiting)
                waiting = []
        if waiting:
            log_mel(waiting)
        if device is not None:
            devices.synchronize(device)
    wall_s = time.perf_counter() - start
    workers_cpu = children_cpu_s() - children_before  # the workers are reaped when the pipeline closes
    return {
        "workers": workers,
        "songs": len(paths) - errors,
        "errors": errors,
        "audio_seconds": audio_seconds,
        "wall_s": wall_s,
        "songs_per_s": (len(paths) - errors) / wall_s,
        "audio_seconds_per_s": audio_seconds / wall_s,
        "worker_cpu_s_per_song": workers_cpu / len(paths),
        "consumer_cpu_s_per_song": (time.process_time() - cpu_before) / len(paths),
    }


def cores_needed(runs: list[dict], goal: float, mean_song_s: float) -> dict:
    """Cores that keep a device at `goal` audio-s/s: decoding CPU per song (the most economical run, the
    least contended) times the songs per second the goal needs, rounded up, and one core for the device."""
    per_song = min(r["worker_cpu_s_per_song"] for r in runs)
    songs_per_s = goal / mean_song_s
    return {
        "goal_audio_seconds_per_s": goal,
        "songs_per_s": songs_per_s,
        "decode_cpu_s_per_song": per_song,
        "decode_cores": songs_per_s * per_song,
        "cores": math.ceil(songs_per_s * per_song) + 1,
    }


def markdown(report: dict) -> str:
    setup, need = report["setup"], report["cores_needed"]
    lines = [
        f"Machine: {setup['machine']}; features on {setup['device']}, batches of {setup['batch']}.",
        f"Songs: {setup['songs']} mp3 files, 44.1 kHz stereo, {setup['mean_song_s']:.0f} s on average "
        f"({setup['audio_seconds']:.0f} s of audio).",
        "",
        "| worker processes | songs/s | audio-s/s | × one worker | worker CPU s per song | consumer CPU s per song |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run_ in report["runs"]:
        lines.append(
            f"| {run_['workers']} | {run_['songs_per_s']:.2f} | {run_['audio_seconds_per_s']:.0f} | "
            f"{run_['speedup']:.2f}× | {run_['worker_cpu_s_per_song']:.3f} | {run_['consumer_cpu_s_per_song']:.3f} |"
        )
    lines += [
        "",
        f"At {need['goal_audio_seconds_per_s']:.0f} audio-s/s one device takes {need['songs_per_s']:.1f} such songs "
        f"a second; decoding them costs {need['decode_cpu_s_per_song']:.3f} CPU s each here, so "
        f"{need['decode_cores']:.1f} cores of this machine's speed decode for it: **{need['cores']} cores** with "
        "the device's own (features run on the device there).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180.0, help="mean song length; each is 0.8-1.2 times it")
    parser.add_argument("--workers", default="1,2", help="worker process counts, comma-separated (default 1,2)")
    parser.add_argument("--batch", type=int, default=8, help="clips per features batch (default 8)")
    parser.add_argument("--device", default="cpu", help="where the features run (default cpu)")
    parser.add_argument("--no-features", action="store_true",
                        help="decode and resample only: how the workers scale when the features run elsewhere "
                        "(on an accelerator host they run on the device)")  # fmt: skip
    parser.add_argument("--goal", type=float, default=800.0, help="audio-s/s one device should get (default 800)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    device = None if args.no_features else devices.resolve_device(args.device)

    from acecap.model import load_processor
    from acecap.tiny import write_tiny

    with tempfile.TemporaryDirectory(prefix="acecap-pipeline-") as scratch:
        scratch = Path(scratch)
        extractor = load_processor(write_tiny(scratch / "model")).feature_extractor  # the real extractor settings
        paths = [scratch / f"song{i:03d}.mp3" for i in range(args.songs)]
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            lengths = list(pool.map(write_song, paths, [args.seconds] * len(paths), range(len(paths))))
        runs = [run(paths, workers, args.batch, device, extractor) for workers in counts]
    for run_ in runs:
        run_["speedup"] = run_["songs_per_s"] / runs[0]["songs_per_s"]
    mean_song_s = sum(lengths) / len(lengths)
    report = {
        "setup": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "device": str(device) if device is not None else "nowhere (--no-features)",
            "batch": args.batch,
            "songs": args.songs,
            "mean_song_s": mean_song_s,
            "audio_seconds": sum(lengths),
        },
        "runs": runs,
        "cores_needed": cores_needed(runs, args.goal, mean_song_s),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "pipeline.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
