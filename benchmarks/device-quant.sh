#!/usr/bin/env bash
# Issue 20's GPU checks of --quant, time-boxed for one NVIDIA H200 lease (about 4 minutes in all):
#   1. acecap doctor on the card: which quantizations fit, and which its FP8 and int4 kernels can run;
#   2. acecap bench --shapes 7b --quant fp8 and --quant int4, batch 1 and 64, 30 s and 180 s clips;
#   3. acecap compare on a checkpoint acecap did not build: transformers' own save_pretrained of a randomly
#      initialised Qwen2_5OmniThinkerForConditionalGeneration in the 7B config, cuda:bf16 against cuda:bf16:int4.
#
#   bash benchmarks/device-quant.sh [OUT]             # OUT defaults to $OUT, else ./device-quant
#   SHAPE=tiny DEVICE=cpu bash benchmarks/device-quant.sh /tmp/dq   # the same steps on a CPU, tiny shapes
#
# Wheels: the GPU machine has torch 2.11+cu130 and no package registry, so whatever is in .whl/ (carried
# with the working tree) is installed first, without an index. This script needs, beyond what acecap's
# earlier H200 runs carried:
#   torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.whl   (pip download --no-deps -d .whl torchao==0.18.0;
#                                                           its compiled kernels need torch >= 2.11; FP8 uses
#                                                           torch._scaled_mm, int4 torch's tinygemm kernel)
# Step time limits (s): doctor 40, each bench run 45 (30 s clips) or 75 (180 s clips), checkpoint 90,
# compare 110: at most 470 s, about 240-300 s expected. A step that runs out keeps what it wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-device-quant}}
shape=${SHAPE:-7b}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --find-links .whl .whl/*.whl 2>&1 | tail -3
fi
python - <<'EOF'
import importlib.metadata as m, torch
print("torch", torch.__version__, "torchao", m.version("torchao"), "transformers", m.version("transformers"))
EOF
start=$SECONDS
step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to OUT/NAME.log, say how it went
    local name=$1 limit=$2 began=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - began)) s (limit $limit)"
    tail -n 12 "$out/$name.log" | grep -v "Enum subclass"
}

step doctor 40 python -m acecap doctor --device "$device"
for quant in fp8 int4; do
    step "bench-$shape-$quant-30s" 45 python -m acecap bench --device "$device" --shapes "$shape" --quant "$quant" \
        --batch-sizes 1,64 --seconds 30 --tokens 64 --repeats 2 -o "$out/bench-$shape-$quant-30s"
    step "bench-$shape-$quant-180s" 75 python -m acecap bench --device "$device" --shapes "$shape" --quant "$quant" \
        --batch-sizes 1,64 --seconds 180 --tokens 64 --repeats 1 -o "$out/bench-$shape-$quant-180s"
done

# A checkpoint written by transformers itself (thinker only, its own key names and config), not by acecap.
checkpoint=${CHECKPOINT_DIR:-/tmp/acecap-hf-thinker-$shape}
step checkpoint 90 python - "$checkpoint" "$shape" "$device" <<'EOF'
import shutil, sys, tempfile, time
from pathlib import Path

import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from acecap.tiny import full_config, write_tiny

folder, shape, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
start = time.perf_counter()
torch.set_default_dtype(torch.bfloat16)
with torch.device(device):
    model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**full_config(shape)["thinker_config"]))
model.save_pretrained(folder)  # transformers' own files: config.json, safetensors shards, index
with tempfile.TemporaryDirectory() as tiny:  # the real processor, tokenizer and chat template (no weights)
    for path in write_tiny(tiny).iterdir():
        if path.suffix in (".json", ".txt") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, folder / path.name)
print(sorted(p.name for p in folder.iterdir()), f"{time.perf_counter() - start:.0f} s")
EOF
step compare-int4 110 python -m acecap compare --model "$checkpoint" --ref "$device:bf16" --cand "$device:bf16:int4" \
    --max-new-tokens 32 -o "$out/compare-$shape-int4"
rm -rf "$checkpoint"
echo "device-quant: $((SECONDS - start)) s; reports in $out"
