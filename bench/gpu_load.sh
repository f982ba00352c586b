#!/usr/bin/env bash
# Serving under load on one GPU: `epd serve` split (1E + 1P + 1D, its defaults: GPU memory shares,
# CUDA MPS) against `epd serve --colocated 1`, the same `epd bench` workloads on each, one server
# at a time (both would not fit the GPU at once with their default shares):
#
#   source .whl/setup.sh && bash bench/gpu_load.sh OUT_DIR [SETUPS] [IMAGE_COUNTS]
#
# SETUPS: comma-separated, of split (1E + 1P + 1D), colocated (one node), colocatedN (N colocated
# nodes), split-E-P-D (E encoder, P prefill and D decode nodes) (default: split,colocated).
# IMAGE_COUNTS: default 4,1,2. EPD_LOAD_GPUS: `epd serve --gpus` (default: every visible GPU).
# EPD_LOAD_MODEL / EPD_LOAD_PRESET: the checkpoint (default /tmp/m3b, written with the 3b preset).
# EPD_LOAD_ROUTER_WORKERS=N gives both setups' routers `--api-server-count N` (default: epd serve's own).
# Per image count, Poisson rates swept past the knee (RATES_<n> below), 40 requests a rate, JPEG
# images of 1280x720 plus 128 text tokens, 128 output tokens, SLO TTFT <= 1 s and TPOT <= 50 ms.
# Writes OUT_DIR/<setup>_<n>img.json (bench results, per-request records included), serve logs
# (the memory shares and MPS lines are in serve_<setup>.log) and load.log. Then
# `python3 -m bench.compare_runs OUT_DIR` writes the side-by-side report.
set -uo pipefail
out=${1:?usage: bench/gpu_load.sh OUT_DIR [SETUPS] [IMAGE_COUNTS]}
setups=${2:-split,colocated}
counts=${3:-4,1,2}
model=${EPD_LOAD_MODEL:-/tmp/m3b}
preset=${EPD_LOAD_PRESET:-3b}   # the random checkpoint written at $model when it is not there yet
port=8100
RATES_1=${RATES_1:-4,8,16,24}
RATES_2=${RATES_2:-2,4,8,12}
RATES_4=${RATES_4:-2,4,8,12}
mkdir -p "$out"
log="$out/load.log"
export PYTHONUNBUFFERED=1

[ -d "$model" ] || timeout 180 python3 -m epd.cli tiny-model qwen2_5_vl "$model" --preset "$preset" --device cuda >>"$log" 2>&1

serve_until_ready() {  # serve_until_ready SETUP: start epd serve (defaults) and wait for its ready line
    local setup=$1 extra=() e p d
    case $setup in   # split: 1E 1P 1D; colocated: 1 node; colocatedN: N nodes; split-E-P-D: E, P and D nodes
        colocated) extra=(--colocated 1) ;;
        colocated[0-9]*) extra=(--colocated "${setup#colocated}") ;;
        split-*) IFS=- read -r _ e p d <<<"$setup"; extra=(--encoders "$e" --prefills "$p" --decodes "$d") ;;
    esac
    [ -n "${EPD_LOAD_GPUS:-}" ] && extra+=(--gpus "$EPD_LOAD_GPUS")
    [ -n "${EPD_LOAD_ROUTER_WORKERS:-}" ] && extra+=(--api-server-count "$EPD_LOAD_ROUTER_WORKERS")
    python3 -m epd.cli serve --model "$model" --port $port "${extra[@]}" --log-dir "$out/logs_$setup" \
        >"$out/serve_$setup.log" 2>&1 &
    serve_pid=$!
    local t0=$SECONDS
    until grep -qs "EPD ready on" "$out/serve_$setup.log"; do
        if ! kill -0 $serve_pid 2>/dev/null || (( SECONDS - t0 > 480 )); then
            echo "== $setup: did not come up after $((SECONDS - t0)) s" | tee -a "$log"
            return 1
        fi
        sleep 2
    done
    echo "== $setup: ready after $((SECONDS - t0)) s" | tee -a "$log"
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader >>"$out/serve_$setup.log" 2>&1
    return 0
}

for setup in ${setups//,/ }; do
    if serve_until_ready "$setup"; then
        for n in ${counts//,/ }; do
            rates_var="RATES_$n"
            t0=$SECONDS
            timeout 300 python3 -m epd.cli bench --base-url "http://127.0.0.1:$port" --model "$model" \
                --dataset random-image --images-per-request "$n" --image-resolution 1280x720 --image-format jpeg \
                --random-input-len 128 --random-output-len 128 --tokenizer "$model" --num-prompts ${EPD_LOAD_PROMPTS:-40} \
                --warmup-requests 4 --sweep-rates "${!rates_var:-2,4,8}" --slo ttft_ms=1000 tpot_ms=50 \
                --seed 7 --no-progress --output "$out/${setup}_${n}img.json" >>"$log" 2>&1
            echo "== $setup ${n} images: exit $? after $((SECONDS - t0)) s" | tee -a "$log"
        done
    fi
    kill -TERM $serve_pid 2>/dev/null
    wait $serve_pid
    grep -h "WARNING\|Error\|error" "$out/logs_$setup"/*.log 2>/dev/null | tail -20 >>"$out/serve_$setup.log" || true
done
