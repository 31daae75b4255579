"""The serve load benchmark: N concurrent clients against `acecap serve` on localhost, batching on and off.

Each client sends a request, waits for its answer and sends the next, until --duration seconds are up;
then the requests still out are waited for, so every request sent is answered and counted. Every answer
is matched to its request by X-Request-Id, and the server's own request counter must equal the number
sent: nothing lost, nothing answered twice. Both runs use one loaded model, the same clips and settings;
only the server's batch size differs (1 for "off").

    python benchmarks/serve_load.py                       # small shape on the CPU, 16 clients, 120 s per run
    python benchmarks/serve_load.py --shape tiny --duration 3 --clients 4 -o /tmp/load   # smoke run

Writes serve_load.json and serve_load.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile

from acecap import devices
from acecap.bench import environment, random_captioner
from acecap.serve import ServeConfig, running


def clip_wav(seconds: float, index: int) -> str:
    """Base64 wav of a short chord with a little noise, different for every index."""
    rng = np.random.default_rng(index)
    t = np.arange(int(seconds * 16000)) / 16000
    root = rng.uniform(110, 330)
    tone = sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1, 1.25, 1.5)) / 15
    buffer = io.BytesIO()
    soundfile.write(buffer, (tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(name: str, answers: list[dict], wall_s: float, sent: list[str], served: float) -> dict:
    """Rates over the whole run, drain included: requests answered successfully per second of wall time."""
    ok = [a for a in answers if a["status"] == 200]
    latencies = [a["latency_s"] for a in ok]
    ids = [a["id"] for a in answers]
    return {
        "server": name,
        "sent": len(sent),
        "answered": len(answers),
        "ok": len(ok),
        "errors": len(answers) - len(ok),
        "statuses": {
            str(s): sum(1 for a in answers if a["status"] == s) for s in sorted({a["status"] for a in answers})
        },
        "each_answered_once": sorted(ids) == sorted(sent) and len(set(ids)) == len(ids),
        "server_counted": served,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "completion_tokens": sum(a["completion_tokens"] for a in ok),
        "output_tokens_per_s": sum(a["completion_tokens"] for a in ok) / wall_s,
    }


async def load(url: str, clients: int, duration_s: float, clips: list[str], tokens: int) -> tuple[list, list, float]:
    """Run the clients; (answers, ids sent, wall seconds until the last answer)."""
    answers, sent = [], []
    start = time.perf_counter()
    stop = start + duration_s

    async def client(number: int, http: httpx.AsyncClient) -> None:
        count = 0
        while count == 0 or time.perf_counter() < stop:  # every client sends at least one request
            request_id = f"c{number}-{count}"
            content = [{"type": "input_audio", "input_audio": {"data": clips[(number + count) % len(clips)]}}]
            payload = {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "ignore_eos": True}
            sent.append(request_id)
            began = time.perf_counter()
            response = await http.post("/v1/chat/completions", json=payload, headers={"X-Request-Id": request_id})
            usage = response.json().get("usage", {}) if response.status_code == 200 else {}
            answers.append({"id": response.headers.get("x-request-id"), "status": response.status_code,
                            "latency_s": time.perf_counter() - began,
                            "completion_tokens": usage.get("completion_tokens", 0)})  # fmt: skip
            count += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))
    return answers, sent, time.perf_counter() - start


def served_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("acecap_requests_total{"))


def markdown(report: dict) -> str:
    setup = report["setup"]
    rows = [
        "| server | clients | sent | ok | errors | each answered once | req/s | p50 latency (s) | p99 latency (s) "
        "| output tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        rows.append(
            f"| {run['server']} | {setup['clients']} | {run['sent']} | {run['ok']} | {run['errors']} | "
            f"{'yes' if run['each_answered_once'] and run['server_counted'] == run['sent'] else 'NO'} | "
            f"{run['requests_per_s']:.3f} | {run['latency_p50_s']:.2f} | {run['latency_p99_s']:.2f} | "
            f"{run['output_tokens_per_s']:.1f} |"
        )
    return "\n".join(
        [
            f"Machine: {setup['machine']}; torch {setup['torch']}, transformers {setup['transformers']}.",
            f"Model: random weights, `{setup['shape']}` shape, {setup['dtype']} on {setup['device']}; "
            f"{setup['clients']} clients for {setup['duration_s']:g} s per server, {setup['seconds']:g} s clips, "
            f"{setup['tokens']} tokens per answer (end token ignored).",
            "",
            *rows,
            "",
            f"**Batching gain: {report['gain']:.2f}×** requests per second (batch size up to "
            f"{setup['max_batch_size']} against 1).",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "7b"], help="random model shape")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, npu, …")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load per server (default 120)")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per request (default 5)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer, end token ignored (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching server's batch size")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    report = {
        "setup": {
            **environment(device, dtype),
            "shape": args.shape,
            "clients": args.clients,
            "duration_s": args.duration,
            "seconds": args.seconds,
            "tokens": args.tokens,
            "max_batch_size": args.max_batch_size,
        },
        "runs": [],
    }
    clips = [clip_wav(args.seconds, i) for i in range(8)]
    captioner = random_captioner(args.shape, str(device), devices.dtype_name(dtype))
    limits = {"max_new_tokens": args.tokens, "max_queue": 4 * args.clients}
    for name, batch in (("batching on", args.max_batch_size), ("batching off", 1)):
        with running(captioner, ServeConfig(max_batch_size=batch, **limits)) as url:
            asyncio.run(load(url, 1, 0.0, clips, args.tokens))  # warm-up: one request, left out
            before = served_count(url)
            answers, sent, wall_s = asyncio.run(load(url, args.clients, args.duration, clips, args.tokens))
            served = served_count(url) - before
        report["runs"].append(summarise(name, answers, wall_s, sent, served))
        print(f"{name}: {report['runs'][-1]['requests_per_s']:.3f} req/s", flush=True)
    on, off = report["runs"]
    report["gain"] = on["requests_per_s"] / off["requests_per_s"]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "serve_load.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
