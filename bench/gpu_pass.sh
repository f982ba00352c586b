#!/usr/bin/env bash
# The whole GPU test-and-benchmark pass of BENCHMARKS.md, for a GPU host that starts bare:
#
#   source .whl/setup.sh && bash bench/gpu_pass.sh OUT_DIR [STEPS]
#
# STEPS (comma-separated, default all but sweep): tests, gemv, sweep, bench, llava, qwen_decode,
# attention, kv, ttft, mllama, mllama_ttft, families, load_workers, serve7b. `families` runs the GPU
# tests of Llama-3.2-Vision and Llama 4 (graph decode, CUDA IPC of image rows, MoE kernels, the Llama 4
# processor against transformers'); `load_workers` the serving-under-load sweep with 4 router
# processes (1 image at 16 and 24 req/s, 2 images at 8), split and colocated; `serve7b` brings up
# `epd serve` with its defaults on the 7b preset and serves a 4-image workload; `llama4` the Llama 4
# scout-12l preset's decode (graphs, the MoE kernels; the roofline counts the experts a batch is
# expected to pick) and prefill; `moe` the routed-experts Triton kernels against a per-expert loop of
# cuBLAS GEMMs at Scout's expert shapes (bench/gpu_moe.py); `multi2` / `multi4` (2 / 4 GPUs) N
# colocated nodes against E/P/D splits of the same GPUs, each node on its GPU (`epd serve --gpus`),
# for EPD_MULTI_IMAGES images a request (default 4; one image count a device call); `tp` (a machine of 2 GPUs or more) the tensor-parallel GPU tests and
# scout-12l's decode and prefill over 2 GPUs (the roofline counts the bytes one rank reads). `mllama` measures the Llama-3.2-Vision 11b preset (decode
# with one 4-tile image of cross-attention rows per request, prefill, vision tower); `mllama_ttft` its
# TTFT for a 1120x1120 image, colocated against 1E + 1P + 1D. `llava` measures the LLaVA-1.5 7b preset (decode, prefill, vision tower,
# transformers' generate); `qwen_decode` the Qwen 3b / 7b graph decode only (no variants).
# All of them take about eleven minutes, over one device call's ten: run them as two calls, e.g.
# "tests,gemv,bench" then "attention,kv,ttft". `sweep` (about four minutes) times every GEMV block
# config of bench.gpu_gemv's SWEEP for q/k/v, o_proj and down_proj at 1 and 8 rows, and a bench step
# after it adds the decode variant with the configs it ranked best. Writes to OUT_DIR: pass.log,
# tests.log, gemv.json, sweep.json,
# gpu.json, gpu_llava.json, gpu_qwen_decode.json, profile_*.txt, attn.json, kv_ipc.json, ttft.json.
# Each step has its own time limit and a failing step does not stop the others; pass.log says
# which failed.
set -uo pipefail
out=${1:?usage: bench/gpu_pass.sh OUT_DIR [STEPS]}
steps=",${2:-tests,gemv,bench,attention,kv,ttft},"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/pass.log"

step() {  # step NAME SECONDS COMMAND...: run if NAME is in STEPS, with a time limit; note how it ended
    local name=$1 limit=$2
    shift 2
    [[ $steps == *",$name,"* || $name == model* ]] || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$log"
}

model() {  # model DIR ARCH PRESET: write the random checkpoint once
    [ -d "$1" ] || step "model $2 $3" 300 python3 -m epd.cli tiny-model "$2" "$1" --preset "$3" --device cuda
}
want() { [[ $steps == *",$1,"* ]]; }
if want tests || want bench || want qwen_decode || want ttft; then model /tmp/m3b qwen2_5_vl 3b; fi
if want bench || want qwen_decode || want kv; then model /tmp/m7b qwen2_5_vl 7b; fi
want llava && model /tmp/mllava7b llava 7b
if want mllama || want mllama_ttft; then model /tmp/mllama11b mllama 11b; fi
if want llama4 || want tp; then model /tmp/mscout12l llama4 scout-12l; fi
if [[ $steps == *",tests,"* ]]; then
    EPD_GPU_MODEL_3B=/tmp/m3b timeout 420 python3 -m pytest tests/gpu -m gpu -q >"$out/tests.log" 2>&1
    echo "== tests: exit $? ($(tail -1 "$out/tests.log"))" | tee -a "$log"
fi
step gemv 90 python3 -m bench.gpu_gemv --out "$out/gemv.json"
step sweep 270 python3 -m bench.gpu_gemv --sweep --only qkv,o_proj,down --rows 1,8 --out "$out/sweep.json"
swept=()
[ -f "$out/sweep.json" ] && swept=(--gemv-configs "$out/sweep.json")
step bench 280 python3 -m bench.gpu_bench --out "$out/gpu.json" --model 3b=/tmp/m3b --model 7b=/tmp/m7b "${swept[@]}"
step llava 300 python3 -m bench.gpu_bench --out "$out/gpu_llava.json" --model llava7b=/tmp/mllava7b \
    --sections decode,profile,prefill,vision,hf
step qwen_decode 200 python3 -m bench.gpu_bench --out "$out/gpu_qwen_decode.json" --model 3b=/tmp/m3b \
    --model 7b=/tmp/m7b --sections decode
step mllama 300 python3 -m bench.gpu_bench --out "$out/gpu_mllama.json" --model mllama11b=/tmp/mllama11b \
    --vision mllama11b --sections decode,prefill,vision --skip-hf
step mllama_ttft 300 python3 -m bench.gpu_disagg_ttft --model /tmp/mllama11b --image-size 1120x1120 \
    --kv-cache-tokens 16384 --requests 10 --one-at-a-time --log-dir "$out/mllama_ttft_logs" \
    --out "$out/ttft_mllama.json"
if [[ $steps == *",families,"* ]]; then
    timeout 420 python3 -m pytest tests/gpu/test_families.py tests/gpu/test_moe_kernels.py \
        tests/gpu/test_llama4_processor.py tests/gpu/test_kv_ipc.py -m gpu -q -rf \
        -k "((mllama or llama4 or cross or moe or processor or ipc) and not large) or (large and mllama)" >"$out/families.log" 2>&1
    echo "== families: exit $? ($(tail -1 "$out/families.log"))" | tee -a "$log"
fi
step load_workers 330 env EPD_LOAD_ROUTER_WORKERS=4 RATES_1=16,24 RATES_2=8 EPD_LOAD_PROMPTS=40 \
    bash bench/gpu_load.sh "$out/load_workers" split,colocated 1,2
want load_workers && pkill -f "epd.cli serve"   # a sweep cut off by its limit leaves its server
step serve7b 200 env EPD_LOAD_MODEL=/tmp/m7b EPD_LOAD_PRESET=7b RATES_4=2 EPD_LOAD_PROMPTS=12 \
    bash bench/gpu_load.sh "$out/serve7b" split 4
want serve7b && pkill -f "epd.cli serve"
# 2 or 4 GPUs (the multi-GPU goodput issue): N colocated nodes against splits of the same N GPUs
step multi2 590 env RATES_1=8,16,32 RATES_2=4,8,16 RATES_4=2,4,8,12 EPD_LOAD_PROMPTS=40 EPD_LOAD_GPUS=0,1 \
    bash bench/gpu_load.sh "$out/multi2" colocated2,split-1-1-1 "${EPD_MULTI_IMAGES:-4}"
step multi4 590 env RATES_1=16,32,48 RATES_2=8,16,24 RATES_4=4,8,16,24 EPD_LOAD_PROMPTS=40 EPD_LOAD_GPUS=0,1,2,3 \
    bash bench/gpu_load.sh "$out/multi4" colocated4,split-1-1-2,split-1-2-1 "${EPD_MULTI_IMAGES:-4}"
step moe 120 python3 -m bench.gpu_moe --out "$out/moe.json"
step llama4 300 python3 -m bench.gpu_bench --out "$out/gpu_llama4.json" --model scout12l=/tmp/mscout12l \
    --sections decode,prefill --skip-hf
if [[ $steps == *",tp,"* ]]; then   # two GPUs or more: tensor parallelism against one GPU
    timeout 400 python3 -m pytest tests/gpu/test_tensor_parallel_gpu.py -m gpu -q -rf >"$out/tp_tests.log" 2>&1
    echo "== tp tests: exit $? ($(tail -1 "$out/tp_tests.log"))" | tee -a "$log"
fi
step tp 300 python3 -m bench.gpu_bench --out "$out/gpu_tp.json" --model scout12l_tp2=/tmp/mscout12l \
    --tensor-parallel-size 2 --sections decode,prefill --skip-hf
step attention 50 python3 -m bench.gpu_attention --out "$out/attn.json"
step kv 60 python3 -m bench.gpu_kv_transfer --preset 7b --ipc --out "$out/kv_ipc.json"
# (`--variant='--ucx-progress thread-polling'` adds a run with a spinning UCX progress thread: no
# faster in N2 and N4, BENCHMARKS.md)
step ttft 180 python3 -m bench.gpu_disagg_ttft --model /tmp/m3b --out "$out/ttft.json" --requests 40
