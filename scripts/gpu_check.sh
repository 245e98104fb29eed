#!/usr/bin/env bash
# The GPU check (issue 23), in stages, from a copy of the working tree on a GPU machine with no network.
# Results: JSON and logs under $OUT (default runs/gpu). Prepared on a CPU machine with `scripts/gpu_pack.sh`,
# which puts what the GPU machine lacks (bitsandbytes, gguf and the serving stack as a site folder; SmolLM2's
# GGUF in two halves) into the git-ignored .gpu/a and .gpu/b, each small enough to travel with one command.
#
#   scripts/gpu_check.sh receive a probe tests smoke     # first command: site + half the model, probe, CUDA tests
#   scripts/gpu_check.sh receive b model bench serve shapes  # second: the model, benches, server, shapes, projection
#   make gpu-check                                       # all stages on a machine that has the files already
#
# Stages: receive DIR (move .gpu/DIR into $WORK), probe (GPU, driver, CUDA, torch, bitsandbytes), tests (pytest -m
# cuda), smoke (the shapes script on a tiny random model), model (SmolLM2 from its GGUF, as `onejump assets`
# converts it), bench (onejump bench: bf16, bnb-8bit and bnb-4bit side by side; batch 1 and 8), serve (the server with bnb-4bit,
# one request per mode), shapes (random Gemma-3 and 7B
# shapes, the projection at SmolLM2's exit traces). Each stage logs to $OUT/<stage>.log and goes on after a failure.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
WORK=${ONEJUMP_GPU_WORK:-/tmp/onejump-gpu}  # survives between commands while the machine stays warm
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL="$WORK/models/smollm2-135m-instruct"
JUMP=docs/results/smollm2-135m/jump.safetensors
PROMPTS=${GPU_PROMPTS:-evals/workloads/grounded-heldout.jsonl}
OPEN_PROMPTS=${GPU_OPEN_PROMPTS:-evals/workloads/open-heldout.jsonl}
NEW_TOKENS=${GPU_NEW_TOKENS:-64}
failed=()

stage_receive() {
  local dir=".gpu/$1"
  [ -d "$dir" ] || { echo "nothing carried in $dir"; return 1; }
  mv -f "$dir"/* "$WORK"/
  if [ -f "$WORK/site.tar.xz" ]; then mkdir -p "$WORK/site" && tar -xJf "$WORK/site.tar.xz" -C "$WORK/site" && rm "$WORK/site.tar.xz"; fi
  ls -la "$WORK"
}

stage_probe() {
  nvidia-smi || true
  "$PY" - "$OUT/probe.json" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()}
for name in ("transformers", "bitsandbytes", "gguf", "fastapi", "pydantic", "accelerate", "safetensors"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001 - a probe reports what is missing
        info[name] = f"missing: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
}

stage_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml="$OUT/cuda-tests.xml"
}

stage_smoke() {
  "$PY" -m shortcuts.lab.gpu_shapes --out "$OUT/smoke.json" --shapes tiny --prompts 2 --new-tokens 8
}

stage_model() {
  local gguf="$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$gguf" ]; then cat "$WORK"/smollm2.gguf.part* > "$gguf" && rm "$WORK"/smollm2.gguf.part*; fi
  echo "$(cat "$WORK/smollm2.sha256")  $gguf" | sha256sum -c -
  [ -f "$MODEL/model.safetensors" ] || "$PY" -c "
from pathlib import Path; from shortcuts.assets import convert_gguf
print(convert_gguf(Path('$gguf'), Path('$MODEL')))"
}

bench() {  # bench NAME QUANTIZATION BATCH PROMPTS MAX_PROMPTS
  "$PY" -m shortcuts.cli bench --model "$MODEL" --jump "$JUMP" --prompts "$4" --max-prompts "$5" \
    --new-tokens "$NEW_TOKENS" --device cuda --dtype bfloat16 --quantization "$2" --batch-size "$3" --graphs --keep-going \
    --json > "$OUT/bench-$1.json"
  tail -c 2000 "$OUT/bench-$1.json"; echo
}

stage_bench1() {  # the short version: grounded requests at batch 1, bf16 and bitsandbytes 4-bit side by side
  bench grounded-b1 none,bnb-4bit 1 "$PROMPTS" 8
}

stage_bench() {  # every weight format side by side in one run: bf16 (none), bitsandbytes 8-bit and 4-bit
  bench grounded-b1 none,bnb-8bit,bnb-4bit 1 "$PROMPTS" 8
  bench open-b1 none 1 "$OPEN_PROMPTS" 8
  bench grounded-b8 none,bnb-8bit,bnb-4bit 8 "$PROMPTS" 16
}

stage_serve() {  # the server on the GPU with bitsandbytes 4-bit: /ready, one request per mode, /v1/models, metrics
  ONEJUMP_MODEL="$MODEL" ONEJUMP_JUMP="$JUMP" ONEJUMP_QUANTIZATION=bnb-4bit ONEJUMP_DEVICE=cuda ONEJUMP_PORT=8765 \
    "$PY" -m service > "$OUT/serve-server.log" 2>&1 &
  local pid=$! rc=0
  "$PY" scripts/gpu_serve_smoke.py "$OUT/serve.json" || rc=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  return $rc
}

stage_shapes7b() {  # the 7B shape alone, projected at this run's SmolLM2 exit traces
  "$PY" -m shortcuts.lab.gpu_shapes --out "$OUT/shapes-7b.json" --shapes llama-2-7b --traces "$OUT/bench-grounded-b1.json"
}

stage_shapes() {
  "$PY" -m shortcuts.lab.gpu_shapes --out "$OUT/shapes.json" --traces "$OUT/bench-grounded-b1.json"
}

run_stage() {
  local name=$1; shift
  echo "=== $name $* ($(date +%T))"
  local t0=$SECONDS
  if "stage_$name" "$@" > >(tee "$OUT/$name${1:+-$1}.log") 2>&1; then echo "=== $name ok in $((SECONDS - t0))s"
  else echo "=== $name FAILED in $((SECONDS - t0))s"; failed+=("$name"); fi
}

[ $# -gt 0 ] || set -- probe tests smoke model bench serve shapes
while [ $# -gt 0 ]; do
  stage=$1; shift
  if [ "$stage" = receive ]; then run_stage receive "$1"; shift; else run_stage "$stage"; fi
done
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
