#!/usr/bin/env bash
# The one-GPU runs behind benchmarks/RESULTS.md, by mode, any number of modes in one command.
# "latency" and "throughput" run this tree and a baseline tree (an earlier commit, extracted into
# $BASE) side by side on the same random-weight folders.
#
#   OUT=out BASE=.baseline BUDGET=540 bash benchmarks/gpu_runs.sh tests latency   # GPU tests, decode latency
#   OUT=out BASE=.baseline bash benchmarks/gpu_runs.sh throughput      # offline "mixed"
#   OUT=out bash benchmarks/gpu_runs.sh serving                        # online, Poisson rate 16/s
#   OUT=out bash benchmarks/gpu_runs.sh online-offline   # 8B "mixed": offline vs the server, all requests at once
#   OUT=out bash benchmarks/gpu_runs.sh graph-bound                    # "mixed" with every step in a graph
#   OUT=out bash benchmarks/gpu_runs.sh kernels moe quant structured          # kernel tests, MoE, FP8/W4A16, grammars
#   OUT=out BASE=.baseline bash benchmarks/gpu_runs.sh quant-ab quant-decode   # W4A16: GEMMs of this tree
#       and the baseline's, kernel tests; 8B decode in bf16 and AWQ
#   OUT=out bash benchmarks/gpu_runs.sh quant-gemv   # kernel tests, then the W4A16 GEMV's and FP8 tiles at batch 1
#   OUT=out bash benchmarks/gpu_runs.sh quant-tests  # the FP8 fusion and quantized-kernel tests on the GPU
#   OUT=out bash benchmarks/gpu_runs.sh l2-probe     # batch-1 GEMVs: from HBM, from L2, and with an L2 prefetch
#   OUT=out bash benchmarks/gpu_runs.sh pdl-ab       # 8B batch-1 decode with and without programmatic dependent launch
#   OUT=out bash benchmarks/gpu_runs.sh quant-tiles  # W4A16 tensor-core tiles at 16-128 rows (mma.sync vs wgmma)
#   OUT=out GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/gpu_runs.sh perplexity   # issue 13's
#       perplexity table on the GPU (bf16, FP8, W4A16 RTN, FP8 KV)
#   OUT=out bash benchmarks/gpu_runs.sh quant-decode-70b   # the 70B shape in W4A16 on one GPU, batch 1 and 32
#   OUT=out bash benchmarks/gpu_runs.sh quant-mixed  # 8B "mixed": bf16, FP8 weights, FP8 + FP8 KV (KV blocks);
#       MIXED_VARIANTS="fp8-kv" runs some of them
#   OUT=out bash benchmarks/gpu_runs.sh moe-model   # Qwen3-30B-A3B shape: decode vs roofline, offline "mixed"
#   OUT=out bash benchmarks/gpu_runs.sh profile     # py-spy (native) of the host-bound 0.5B batch-128 decode
#   OUT=out bash benchmarks/gpu_runs.sh tp-throughput   # two GPUs: 8B "mixed" at tp=1, then tp=2
#   OUT=out bash benchmarks/gpu_runs.sh trace       # 8B kernel traces (decode batch 1 and 128, an 8192-token
#       prompt; gzipped chrome traces in $OUT/traces) and the "mixed" roofline per step; BANDWIDTH_GBS and
#       PEAK_TFLOPS (default: this machine type's 4,248 GB/s copy and 779 TFLOP/s bf16 matmul) feed the roofline
#   OUT=out bash benchmarks/gpu_runs.sh trace-fp8   # 8B batch-1 decode traces, bf16 and online FP8 weights
#   OUT=out bash benchmarks/gpu_runs.sh trace-w4a16 # 8B batch-1 decode trace, W4A16 weights (AWQ layout)
#   OUT=out BASE=.baseline bash benchmarks/gpu_runs.sh attention-fp8   # attention on bf16 / FP8 caches, A/B
#   OUT=out bash benchmarks/gpu_runs.sh trace-b128  # the 8B batch-128 decode trace alone
#   OUT=out bash benchmarks/gpu_runs.sh trace-tp2   # two GPUs: rank 0's kernel trace of 8B tp=2 decode at
#       batch 1, with NCCL all-reduces and with the one-shot kernel
#   OUT=out BASE=.baseline bash benchmarks/gpu_runs.sh host-ab   # the host-bound 0.5B shape: base and this
#       tree alternating twice (the first pass also fills Triton's cache), nothing else running
#
# Every step runs on its own with a time limit, so one failure leaves the others' results.
set -u
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || { echo "usage: $0 MODE... (tests, latency, throughput, serving)"; exit 2; }
PY=${PYTHON:-python3}
ROOT=${MODEL_ROOT:-/dev/shm/kubellm-models}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
BASE=$(realpath "${BASE:-.baseline}")

# BUDGET (seconds) caps the whole command: a step gets at most what is left of it. Use it instead of
# an outer `timeout`, whose signal does not reach a step's own `timeout` (a process group of its own),
# so a step cut that way keeps running on the GPU behind the next one.
BUDGET=${BUDGET:-86400}
START=$SECONDS
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START) - 5))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then echo "=== $name SKIPPED (budget spent)"; return 1; fi
  echo "=== $name ($(date +%T), limit $limit s): $*"
  local status=0
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || status=$?
  [ $status = 0 ] || echo "=== $name FAILED (exit $status)"
}

written=no
write_models() {  # the 8B and 0.5B random-weight folders, once, for the modes that use them
  [ $written = yes ] && return
  step write-8b 150 $PY -m benchmarks.gpu_random_model --model llama-3.1-8b --model-root "$ROOT"
  step write-0.5b 60 $PY -m benchmarks.gpu_random_model --model qwen2.5-0.5b --model-root "$ROOT"
  written=yes
}

tree_dir() { [ "$1" = new ] && pwd || echo "$BASE"; }

latency() {  # latency TREE...
  for model in llama-3.1-8b qwen2.5-0.5b; do
    batches=$([ $model = llama-3.1-8b ] && echo 1,128 || echo 32,128)
    for tree in "$@"; do
      step "latency-$model-$tree" 110 env -C "$(tree_dir $tree)" $PY -m benchmarks.latency --model $model \
        --model-root "$ROOT" --batches $batches --new-tokens 128 --ttft-lens 1024 --out "$OUT/latency-$model-$tree.json"
    done
  done
}

throughput() {  # throughput TREE...
  for model in llama-3.1-8b qwen2.5-0.5b; do
    for tree in "$@"; do
      step "throughput-$model-$tree" 120 env -C "$(tree_dir $tree)" $PY -m benchmarks.throughput --model $model \
        --model-root "$ROOT" --workload mixed --systems kubellm --out "$OUT/throughput-$model-$tree.json"
    done
  done
}

for mode in "$@"; do
  case $mode in kernels|moe|moe-model|profile|quant-ab|quant-gemv|quant-tiles|quant-tests|l2-probe|perplexity|attention-fp8) ;; *) write_models ;; esac
  case $mode in
    tests) step gpu-tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_graphs.py -x ;;
    kernels) step kernel-tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_moe.py \
               tests/test_quant_kernels.py ;;
    moe) step moe 120 $PY -m benchmarks.moe_gpu --out "$OUT/moe.json" ;;
    quant) step quant-gemm 120 $PY -m benchmarks.quant_gpu --out "$OUT/quant-gemm.json"
           step quant-decode 200 $PY -m benchmarks.quant_gpu --skip-gemm --decode --model llama-3.1-8b \
             --model-root "$ROOT" --formats bf16,fp8-online,awq --batches 1,32 --out "$OUT/quant-decode.json" ;;
    quant-ab) for tree in new base; do
                step "quant-gemm-$tree" 120 env -C "$(tree_dir $tree)" $PY -m benchmarks.quant_gpu \
                  --gemm-batches 1,64,128,256 --stack-batches 1,128 --stack-formats bf16,w4a16 \
                  --out "$OUT/quant-gemm-$tree.json"
              done
              step quant-kernel-tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py -x ;;
    quant-tests) step quant-tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_fp8_fusion.py \
                   tests/test_quant_kernels.py ;;
    # 8B batch-1 decode in bf16, FP8 and W4A16 with programmatic dependent launch, then without (KUBELLM_PDL=0).
    pdl-ab) for pdl in 1 0; do
              step "decode-b1-pdl$pdl" 110 env KUBELLM_PDL=$pdl $PY -m benchmarks.quant_gpu --skip-gemm --stack-batches '' \
                --decode --model llama-3.1-8b --model-root "$ROOT" --formats bf16,fp8-online,awq --batches 1 \
                --out "$OUT/b1-pdl$pdl.json"
            done ;;
    # Batch-1 GEMVs from HBM, from L2, streamed without arithmetic, and behind a spin with an L2 prefetch.
    l2-probe) step l2-probe 200 $PY -m benchmarks.l2_probe --out "$OUT/l2-probe.json" ;;
    quant-gemv) step quant-kernel-tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py -x
                step quant-sweep-gemv 300 $PY -m benchmarks.quant_gpu --skip-gemm --stack-batches '' \
                  --sweep-batches 1 --sweep-formats w4a16-gemv,fp8 --out "$OUT/quant-sweep-gemv.json" ;;
    # W4A16 tensor-core tiles between 16 and 128 rows: mma.sync row tiles (16, 32) against wgmma ones (64, 128).
    quant-tiles) step quant-sweep-tiles 420 $PY -m benchmarks.quant_gpu --skip-gemm --stack-batches '' \
                   --sweep-batches 16,32,64,128 --sweep-formats w4a16 --out "$OUT/quant-sweep-tiles.json" ;;
    # Perplexity of the built-in model on this GPU: bf16, FP8, W4A16 (kubellm's own RTN, AWQ layout, groups of
    # 64: 128 does not divide SmolLM2's 576 features) and the FP8 KV cache. GGUF names the model file (98 MB: it
    # travels in two halves, in two calls on one warm machine).
    perplexity) step w4a16-rtn 120 $PY -c "import sys; from benchmarks.perplexity import dense_folder; \
from engine.testing.quantized import quantize_model_folder as q; from pathlib import Path; \
d = dense_folder(Path(sys.argv[1]), Path('$ROOT/ppl')); q(d, Path('$ROOT/ppl/rtn-awq-g64'), 'awq', 64)" "$GGUF"
                step perplexity 300 $PY -m benchmarks.perplexity --model "$GGUF" --work-dir "$ROOT/ppl" \
                  --w4a16 "$ROOT/ppl/rtn-awq-g64" --out "$OUT/perplexity-gpu.json" ;;
    quant-decode) step quant-decode 200 $PY -m benchmarks.quant_gpu --skip-gemm --stack-batches '' --decode \
                    --model llama-3.1-8b --model-root "$ROOT" --formats bf16,awq --batches "${DECODE_BATCHES:-1,32,128}" \
                    --out "$OUT/quant-decode.json" ;;
    # 8B "mixed" in bf16, online FP8 weights, and FP8 weights with an FP8 KV cache (KV blocks printed).
    quant-mixed) for variant in ${MIXED_VARIANTS:-bf16 fp8 fp8-kv}; do
                   step "throughput-8b-$variant" 150 $PY -m benchmarks.throughput --model llama-3.1-8b \
                     --model-root "$ROOT" --workload mixed --systems kubellm \
                     $([ $variant != bf16 ] && echo --quantization fp8) \
                     $([ $variant = fp8-kv ] && echo --kv-cache-dtype fp8) --out "$OUT/throughput-8b-$variant.json"
                 done ;;
    # The 70B shape written straight in W4A16 (AWQ layout, ~37 GB), served on one GPU.
    quant-decode-70b) step quant-decode-70b 330 $PY -m benchmarks.quant_gpu --skip-gemm --stack-batches '' --decode \
                        --model llama-3.1-70b --model-root "$ROOT" --formats awq --batches 1,32 \
                        --out "$OUT/quant-decode-70b.json" ;;
    structured) step structured 90 $PY -m benchmarks.structured_output --tokenizer "$ROOT/llama-3.1-8b" \
                  --batch 32 --out "$OUT/structured.json" ;;
    moe-model) step write-30b-a3b 240 $PY -m benchmarks.gpu_random_model --model qwen3-30b-a3b --model-root "$ROOT"
               step latency-qwen3-30b-a3b 200 $PY -m benchmarks.latency --model qwen3-30b-a3b --model-root "$ROOT" \
                 --batches 1,32 --new-tokens 128 --ttft-lens 1024 --out "$OUT/latency-qwen3-30b-a3b.json"
               step throughput-qwen3-30b-a3b 200 $PY -m benchmarks.throughput --model qwen3-30b-a3b \
                 --model-root "$ROOT" --workload mixed --systems kubellm --out "$OUT/throughput-qwen3-30b-a3b.json"
               rm -rf "$ROOT/qwen3-30b-a3b" ;;
    profile) step write-0.5b 60 $PY -m benchmarks.gpu_random_model --model qwen2.5-0.5b --model-root "$ROOT"
             step profile-0.5b 150 py-spy record --nonblocking --rate 100 --format raw -o "$OUT/pyspy-0.5b-b128.txt" -- \
               $PY -m benchmarks.latency --model qwen2.5-0.5b --model-root "$ROOT" --batches 128 --new-tokens 512 \
               --ttft-lens 1024 ;;
    latency) latency new base ;;
    latency-base) latency base ;;
    throughput) throughput new base ;;
    # Offline "mixed" with CUDA graphs up to the whole step budget (8192 tokens) instead of the default bound.
    graph-bound) for model in llama-3.1-8b qwen2.5-0.5b; do
                   step "throughput-$model-graphs-8192" 150 $PY -m benchmarks.throughput --model $model \
                     --model-root "$ROOT" --workload mixed --systems kubellm --max-cudagraph-capture-size 8192 \
                     --out "$OUT/throughput-$model-graphs-8192.json"
                 done ;;
    host-ab) for pass in 1 2; do
               for tree in base new; do
                 step "latency-qwen2.5-0.5b-$tree-$pass" 60 env -C "$(tree_dir $tree)" $PY -m benchmarks.latency \
                   --model qwen2.5-0.5b --model-root "$ROOT" --batches 32,128 --new-tokens 128 --ttft-lens 1024 \
                   --out "$OUT/latency-qwen2.5-0.5b-$tree-$pass.json"
                 step "throughput-qwen2.5-0.5b-$tree-$pass" 60 env -C "$(tree_dir $tree)" $PY -m benchmarks.throughput \
                   --model qwen2.5-0.5b --model-root "$ROOT" --workload mixed --systems kubellm \
                   --out "$OUT/throughput-qwen2.5-0.5b-$tree-$pass.json"
               done
             done ;;
    tp-throughput) for tp in 1 2; do
                     step "throughput-llama-3.1-8b-tp$tp" 150 $PY -m benchmarks.throughput --model llama-3.1-8b \
                       --model-root "$ROOT" --workload mixed --systems kubellm --tensor-parallel-size $tp \
                       --out "$OUT/throughput-llama-3.1-8b-tp$tp.json"
                   done ;;
    # The same 256 "mixed" requests offline (LLM) and through the HTTP server sent all at once:
    # the server's cost over the engine at the same concurrency (max_num_seqs 256 in both).
    online-offline) step throughput-8b-offline 150 $PY -m benchmarks.throughput --model llama-3.1-8b \
                      --model-root "$ROOT" --workload mixed --systems kubellm --out "$OUT/throughput-8b-offline.json"
                    step serving-8b-all-at-once 200 $PY -m benchmarks.serving --model llama-3.1-8b --model-root "$ROOT" \
                      --rates inf --num-requests 256 --out "$OUT/serving-8b-all-at-once.json" ;;
    # Batch-1 decode traces of bf16 and online-FP8 weights side by side (where FP8's step goes).
    trace-fp8) for quantization in none fp8; do
                 step "trace-8b-b1-$quantization" 150 $PY -m benchmarks.kernel_trace --model llama-3.1-8b \
                   --model-root "$ROOT" --batch 1 $([ $quantization = fp8 ] && echo --quantization fp8) \
                   --trace-dir "$OUT/traces-$quantization" --out "$OUT/trace-8b-b1-$quantization.json"
               done ;;
    # Attention kernels on a bf16 and an FP8 cache (this tree), and on an FP8 cache in the base tree.
    attention-fp8) step fp8-kv-tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_fp8_kv_cache.py
                   for run in new-auto new-fp8 base-fp8; do
                     step "attention-$run" 90 env -C "$(tree_dir ${run%-*})" $PY -m benchmarks.attention_kernels \
                       --kv-cache-dtype ${run#*-} --out "$OUT/attention-$run.json"
                   done ;;
    # Batch-1 decode trace of the 8B shape in W4A16 (AWQ layout, groups of 128).
    trace-w4a16) step trace-8b-b1-awq 200 $PY -m benchmarks.kernel_trace --model llama-3.1-8b --model-root "$ROOT" \
                   --batch 1 --weights awq --trace-dir "$OUT/traces-awq" --out "$OUT/trace-8b-b1-awq.json" ;;
    trace-b128) step trace-8b-b128 150 $PY -m benchmarks.kernel_trace --model llama-3.1-8b --model-root "$ROOT" \
                  --batch 128 --trace-dir "$OUT/traces" --out "$OUT/trace-8b-b128.json" ;;
    trace) step roofline-8b-mixed 30 $PY -m benchmarks.roofline --model llama-3.1-8b --workload mixed \
             --bandwidth-gbs "${BANDWIDTH_GBS:-4248}" --peak-tflops "${PEAK_TFLOPS:-779}"
           step trace-8b-b1 150 $PY -m benchmarks.kernel_trace --model llama-3.1-8b --model-root "$ROOT" --batch 1 \
             --prefill-tokens 8192 --trace-dir "$OUT/traces" --out "$OUT/trace-8b-b1.json"
           step trace-8b-b128 150 $PY -m benchmarks.kernel_trace --model llama-3.1-8b --model-root "$ROOT" \
             --batch 128 --trace-dir "$OUT/traces" --out "$OUT/trace-8b-b128.json" ;;
    trace-tp2) for all_reduce in nccl one-shot; do
                 step "trace-8b-tp2-b1-$all_reduce" 180 $PY -m benchmarks.kernel_trace --model llama-3.1-8b \
                   --model-root "$ROOT" --batch 1 --tensor-parallel-size 2 \
                   $([ $all_reduce = one-shot ] && echo --small-all-reduce) \
                   --trace-dir "$OUT/traces-$all_reduce" --out "$OUT/trace-8b-tp2-b1-$all_reduce.json"
               done ;;
    serving) step serving-8b 300 $PY -m benchmarks.serving --model llama-3.1-8b --model-root "$ROOT" --rates 16 \
               --num-requests 256 --out "$OUT/serving-8b.json" ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
