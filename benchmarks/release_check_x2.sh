#!/usr/bin/env bash
# One packed command on a 2 x H200 machine after a round of merges: the GPU tests on GPU 1 while
# GPU 0 measures the single-GPU figures (8B offline "mixed", Qwen3-30B-A3B decode), then both GPUs
# for tensor parallelism (8B decode at tp=1 and tp=2; with SMALL_ALL_REDUCE=1 also with the small all-reduce).
# The two phase-1 tracks share the host's 32 cores; the tests are light on the host, but the
# throughput figure of that phase is read with this in mind.
#
#   OUT=out bash benchmarks/release_check_x2.sh        (logs and JSON under $OUT)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=${MODEL_ROOT:-/dev/shm/kubellm-models}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T)): $*"
  local status=0
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1 || status=$?
  tail -n 30 "$OUT/$name.log"
  [ $status = 0 ] || echo "=== $name FAILED (exit $status)"
}

gpu_tests() {
  CUDA_VISIBLE_DEVICES=1 step gpu-tests 190 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m "not multigpu" \
    ${GPU_TESTS:-tests/test_gpu.py tests/test_cuda_graphs.py tests/test_fp8_kv_cache.py tests/test_fp8_kv_engine.py \
      tests/test_quant_kernels.py}
}

single_gpu_figures() (  # a subshell: GPU 0 only here, both GPUs again for the tensor-parallel phase
  export CUDA_VISIBLE_DEVICES=0
  step write-8b 120 $PY -m benchmarks.gpu_random_model --model llama-3.1-8b --model-root "$ROOT"
  step throughput-8b 120 $PY -m benchmarks.throughput --model llama-3.1-8b --model-root "$ROOT" --workload mixed \
    --systems kubellm --out "$OUT/throughput-8b.json"
  step write-30b-a3b 90 $PY -m benchmarks.gpu_random_model --model qwen3-30b-a3b --model-root "$ROOT"
  step latency-qwen3-30b-a3b 100 $PY -m benchmarks.latency --model qwen3-30b-a3b --model-root "$ROOT" \
    --batches 1,32 --new-tokens 64 --ttft-lens 1024 --out "$OUT/latency-qwen3-30b-a3b.json"
  rm -rf "$ROOT/qwen3-30b-a3b"
)

gpu_tests > "$OUT/track-tests.txt" 2>&1 &
single_gpu_figures
wait
cat "$OUT/track-tests.txt"

LAT=(--model llama-3.1-8b --model-root "$ROOT" --batches "${TP_BATCHES:-1}" --new-tokens 64 --ttft-lens 1024)
CUDA_VISIBLE_DEVICES=0 step latency-8b-tp1 70 $PY -m benchmarks.latency "${LAT[@]}" --out "$OUT/latency-8b-tp1.json"
step latency-8b-tp2 80 $PY -m benchmarks.latency "${LAT[@]}" --tensor-parallel-size 2 --out "$OUT/latency-8b-tp2.json"
[ "${SMALL_ALL_REDUCE:-0}" = 1 ] && step latency-8b-tp2-small-all-reduce 80 $PY -m benchmarks.latency "${LAT[@]}" \
  --tensor-parallel-size 2 --small-all-reduce --out "$OUT/latency-8b-tp2-small-all-reduce.json"
