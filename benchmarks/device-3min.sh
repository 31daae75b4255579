#!/bin/bash
# Whole songs on one accelerator, end to end: tokens checked against transformers (tiny model, fp32), then
# `acecap annotate` on N mp3 songs of ~SEC s (44.1 kHz stereo) with the 7B shapes (random weights on disk),
# then `acecap bench` on the same shapes with the prefill's share of the card's bf16 peak. Every step has a
# time limit (together under 10 minutes) and prints its figures as it goes; logs and reports go to $OUT.
#
# On the GPU machine, from the project's root, wheels for what its Python lacks in .whl/ (docs/benchmarks.md):
#     OUT=/path/to/reports bash benchmarks/device-3min.sh
# On the CPU, with acecap installed (a smoke run of every step, minutes):
#     LOCAL=1 DEV=cpu SHAPE=tiny N=6 SEC=10 OUT=/tmp/o bash benchmarks/device-3min.sh
# Knobs: DEV (cuda), SHAPE (7b), N (128), SEC (180), TOKENS (250), BATCH (64), W (work folder, /tmp/w),
# PY (python3), and each step's limit in seconds: INSTALL_S, MAKE_S, CHECK_S, ANN_S, BENCH_S.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
S=$(date +%s); el() { echo "=== [$(( $(date +%s) - S ))s] $*"; }
DEV=${DEV:-cuda}; SHAPE=${SHAPE:-7b}; N=${N:-128}; SEC=${SEC:-180}; TOKENS=${TOKENS:-250}; BATCH=${BATCH:-64}
W=${W:-/tmp/w}; OUT=${OUT:-/tmp/acecap-device}; PY=${PY:-python3}
mkdir -p "$W" "$OUT"
if [ -z "${LOCAL:-}" ]; then
    el "install the carried wheels and acecap into /tmp/site"
    timeout "${INSTALL_S:-40}" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl . || { echo "install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import os, torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', os.cpu_count(), 'CPU cores')"

el "checkpoint ($SHAPE shapes, random weights) and $N songs of ~$SEC s (mp3, 44.1 kHz stereo), in parallel"
timeout "${MAKE_S:-110}" $PY - "$W" "$SHAPE" "$DEV" <<'PY' &
import sys
from acecap.tiny import write_tiny
write_tiny(sys.argv[1] + "/model", shape=sys.argv[2], device=sys.argv[3])
print("checkpoint written")
PY
CK=$!
timeout "${MAKE_S:-110}" $PY - "$W/songs" "$N" "$SEC" <<'PY'
import os, sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, "benchmarks")
from pipeline import write_song  # the songs benchmarks/pipeline.py measures
folder, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
os.makedirs(folder, exist_ok=True)
paths = [f"{folder}/song{i:04d}.mp3" for i in range(count)]
with ProcessPoolExecutor(os.cpu_count()) as pool:
    lengths = list(pool.map(write_song, paths, [seconds] * count, range(count)))
print(count, "songs,", round(sum(lengths)), "s of audio,", sum(os.path.getsize(p) for p in paths) // 2**20, "MiB")
PY
wait $CK || { echo "checkpoint failed or timed out"; exit 1; }

el "check: greedy tokens of every decoder (one batch, and streamed with refills) against transformers, tiny model, fp32"
timeout "${CHECK_S:-90}" $PY - "$W" "$DEV" "$OUT" <<'PY' 2>&1 | grep -v "Model config" | tee "$OUT/check.log"
import json, sys
import numpy as np, torch
from acecap import Captioner, Decoding
from acecap.audio import Clip
from acecap.features import FEATURE_MARGIN
from acecap.tiny import write_tiny
folder, device = write_tiny(sys.argv[1] + "/tiny"), sys.argv[2]
rng = np.random.default_rng(0)
clips = [Clip((0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32), f"{s}s") for s in (3, 7.5, 1.2, 12, 30, 181)]
decoding = Decoding(max_new_tokens=24)
reference = Captioner.from_pretrained(folder, device=device, dtype="fp32", decoder="transformers")
texts = {"transformers": [r.text for r in reference.caption_clips(clips, decoding)]}
extractor = reference.processor.feature_extractor
features, frames = reference.log_mel([c.samples for c in clips])
worst = 0.0
for row, clip in enumerate(clips):
    expected = extractor(clip.samples, sampling_rate=16000, max_length=len(clip.samples) + FEATURE_MARGIN,
                         truncation=True, padding="max_length", return_tensors="pt")["input_features"][0]
    count = frames[row]
    worst = max(worst, float((features[row, :, :count].cpu() - expected[:, :count]).abs().max()))
print(f"CHECK: device log-mel against the processor's: max |diff| {worst:.2e}", flush=True)
for decoder in (["graphs", "static"] if device.startswith("cuda") else ["static"]):
    # Prompts of over 3,000 tokens (the 181 s clip) are prefilled in two passes.
    ours = Captioner(reference.thinker, reference.processor, task="caption", prompt=reference.prompt,
                     model_name="tiny", load_s=0.0, decoder=decoder, prefill_tokens=3000)
    texts[decoder] = [r.text for r in ours.caption_clips(clips, decoding)]
    streamed = dict(ours.caption_stream(((c.source, c) for c in clips), decoding, rows=2))
    texts[decoder + ", streamed in 2 rows"] = [streamed[c.source].text for c in clips]
    for name in (decoder, decoder + ", streamed in 2 rows"):
        print(f"CHECK: {name}: tokens identical to transformers:", "yes" if texts[name] == texts["transformers"] else
              f"NO ({sum(a != b for a, b in zip(texts[name], texts['transformers']))} of {len(clips)} clips differ)", flush=True)
with open(sys.argv[3] + "/check-texts.json", "w") as handle:
    json.dump(texts, handle, ensure_ascii=False, indent=1)
PY

el "annotate: $N songs, $TOKENS tokens each, batch $BATCH, default decoder"
timeout "${ANN_S:-180}" $PY -m acecap annotate "$W/songs" -o "$W/out" --model "$W/model" --device "$DEV" \
    --max-new-tokens "$TOKENS" --batch-size "$BATCH" --overwrite --quiet > "$OUT/annotate.log" 2>&1
echo "annotate exit status $?"; tail -8 "$OUT/annotate.log"
$PY - "$W/out/annotations.jsonl" "$OUT/annotate.log" <<'PY' | tee "$OUT/annotate-figures.json"
import json, re, sys
records = [json.loads(line) for line in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
ok = [r for r in records if not r.get("error")]
audio = sum(r["duration"] for r in ok)
log = open(sys.argv[2]).read()
found = re.search(r"audio\s+[\d.]+ h in ([\d.]+) s", log)
elapsed = float(found.group(1)) if found else float("nan")
load = ok[0]["timings"]["load_s"] if ok else float("nan")
first = sorted(r["timings"]["first_token_s"] for r in ok)
print(json.dumps({"records": len(records), "ok": len(ok), "audio_s": round(audio), "elapsed_s": elapsed,
                  "model_load_s": load, "audio_s_per_s": audio / elapsed, "audio_s_per_s_after_load": audio / (elapsed - load),
                  "decode_audio_s_median": sorted(r["timings"]["audio_s"] for r in ok)[len(ok) // 2] if ok else None,
                  "first_token_s_median": first[len(first) // 2] if first else None}, indent=1))
PY

el "bench: $SHAPE shapes, $SEC s clips, batch $BATCH, $TOKENS tokens"
timeout "${BENCH_S:-160}" $PY -m acecap bench --shapes "$SHAPE" --device "$DEV" --seconds "$SEC" --batch-sizes "$BATCH" \
    --tokens "$TOKENS" --repeats 2 -o "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench exit status $?"; cat "$OUT/bench/bench.md" 2>/dev/null || tail -5 "$OUT/bench.log"

el "summary"
$PY - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out = sys.argv[1]
try:
    annotate = json.load(open(f"{out}/annotate-figures.json"))
except (OSError, ValueError):
    annotate = {}
try:
    run = json.load(open(f"{out}/bench/bench.json"))["runs"][0]
except (OSError, ValueError, IndexError, KeyError):
    run = {}
bench = run.get("audio_s_per_s")
print(f"annotate: {annotate.get('audio_s_per_s', float('nan')):.1f} audio-s/s end to end, "
      f"{annotate.get('audio_s_per_s_after_load', float('nan')):.1f} after the model load "
      f"({annotate.get('ok')} of {annotate.get('records')} songs; goal >= 800)")
if bench:
    share = run.get("prefill_peak_share")
    print(f"bench:    {bench:.1f} audio-s/s; prefill {run['prefill_tflop_s']:.0f} TFLOP/s"
          + (f" = {share:.0%} of the bf16 peak (goal >= 60 %)" if share is not None else " (peak of this device unknown)"))
    if annotate.get("audio_s_per_s_after_load"):
        print(f"annotate / bench: {annotate['audio_s_per_s_after_load'] / bench:.0%} after the model load, "
              f"{annotate['audio_s_per_s'] / bench:.0%} end to end (goal >= 90 %)")
PY
el done
