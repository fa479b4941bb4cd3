#!/usr/bin/env bash
# Tensor-parallel GPU runs behind benchmarks/RESULTS.md, on one 4-GPU machine:
# the 8B shape at tp=1/2/4 (latency, throughput, bf16 agreement with tp=1) and the
# 70B shape (~141 GB of bf16, more than one GPU holds with a KV cache) at tp=4 and tp=2.
# Every step runs on its own, so one failure leaves the others' results.
#
#   OUT=out bash benchmarks/tp_gpu_run.sh   (JSON and logs: $OUT/results.tgz, refreshed after every step)
#
# SMALL / BIG / GEN_DEVICE / MODEL_ROOT override the shapes and where weights are drawn
# and kept (a CPU smoke run: SMALL=tiny BIG=tiny GEN_DEVICE=cpu DTYPE=float32).
set -u
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMALL=${SMALL:-llama-3.1-8b}
BIG=${BIG:-llama-3.1-70b}
GEN_DEVICE=${GEN_DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
ROOT=${MODEL_ROOT:-/dev/shm/kubellm-models}
RES=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T)): $*"
  local status=0
  timeout "$limit" "$@" || status=$?
  [ $status = 0 ] || echo "=== $name FAILED (exit $status)"
  tar czf "$OUT/results.tgz" -C "$RES" .
  return $status
}

nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null
df -h /dev/shm; nproc
$PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")'

step "write $SMALL" 120 $PY -m benchmarks.gpu_random_model --model "$SMALL" --model-root "$ROOT" --device "$GEN_DEVICE"
# The big model is written on the last GPU while the small one's tp=1/2 runs use the first two.
CUDA_VISIBLE_DEVICES=${BIG_GEN_GPU:-3} $PY -m benchmarks.gpu_random_model --model "$BIG" --model-root "$ROOT/big" \
  --device "$GEN_DEVICE" --shards 16 >"$RES/write_big.log" 2>&1 &
BIG_WRITER=$!

S=(--model "$SMALL" --model-root "$ROOT" --dtype "$DTYPE")
latency() { step "latency $1 tp=$2" 150 $PY -m benchmarks.latency "${@:3}" --tensor-parallel-size "$2" \
  --out "$RES/latency_$1_tp$2.json"; }
throughput() { step "throughput $SMALL tp=$1" 150 $PY -m benchmarks.throughput "${S[@]}" --systems kubellm \
  --workload mixed --num-requests "${REQUESTS:-128}" --tensor-parallel-size "$1" \
  --length-scale "${LENGTH_SCALE:-1}" --out "$RES/throughput_${SMALL}_tp$1.json"; }
SMALL_LATENCY=(--batches 1,32 --prompt-len 128 --new-tokens 64 --ttft-lens "${TTFT_LENS:-1024,4096}")

# Most wanted first: the tp=2 decode speed-up, agreement, the 70B shape, then tp=4 of the 8B.
latency "$SMALL" 1 "${S[@]}" "${SMALL_LATENCY[@]}"
latency "$SMALL" 2 "${S[@]}" "${SMALL_LATENCY[@]}" || latency "$SMALL" 2 "${S[@]}" "${SMALL_LATENCY[@]}" --enforce-eager
agreement() { step "agreement $SMALL tp=$1" 200 $PY -m benchmarks.tp_agreement "${S[@]}" --sizes "$1" \
  --out "$RES/agreement_${SMALL}_tp$1.json"; }
agreement 2
for tp in 1 2; do throughput $tp; done
wait $BIG_WRITER; cat "$RES/write_big.log"
B=(--model "$BIG" --model-root "$ROOT/big" --dtype "$DTYPE" --batches 1,8 --prompt-len 128 --new-tokens 32 --ttft-lens 1024)
for tp in 4 2; do latency "$BIG" $tp "${B[@]}"; done
latency "$SMALL" 4 "${S[@]}" "${SMALL_LATENCY[@]}"
throughput 4
agreement 4
echo "=== done ($(date +%T))"
