#!/usr/bin/env bash
# The whole GPU test-and-benchmark pass of BENCHMARKS.md in one command, for a GPU host that
# starts bare (the steps' time limits add up to about ten minutes, one device call):
#
#   source .whl/setup.sh && bash bench/gpu_pass.sh OUT_DIR
#
# Writes eight files to OUT_DIR: tests.log, pass.log, gpu.json, profile_3b.txt, profile_7b.txt,
# attn.json, kv_ipc.json, ttft.json. Each step has its own time limit and a failing step does not
# stop the others; pass.log says which failed.
set -uo pipefail
out=${1:?usage: bench/gpu_pass.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/pass.log"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, note how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$log"
}

for preset in 3b 7b; do
    [ -d "/tmp/m$preset" ] || step "model $preset" 60 python3 -m epd.cli tiny-model qwen2_5_vl "/tmp/m$preset" \
        --preset "$preset" --device cuda
done
EPD_GPU_MODEL_3B=/tmp/m3b timeout 150 python3 -m pytest tests/gpu -m gpu -q >"$out/tests.log" 2>&1
echo "== tests/gpu: exit $? ($(tail -1 "$out/tests.log"))" | tee -a "$log"
step gpu_bench 110 python3 -m bench.gpu_bench --out "$out/gpu.json" --model 3b=/tmp/m3b --model 7b=/tmp/m7b
step gpu_attention 50 python3 -m bench.gpu_attention --out "$out/attn.json"
step gpu_kv_transfer 60 python3 -m bench.gpu_kv_transfer --preset 7b --ipc --out "$out/kv_ipc.json"
step gpu_disagg_ttft 120 python3 -m bench.gpu_disagg_ttft --model /tmp/m3b --out "$out/ttft.json"
