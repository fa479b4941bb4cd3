#!/usr/bin/env bash
# Tensor-parallel GPU runs behind benchmarks/RESULTS.md, packed for one 2 x H200 command of
# under 9 minutes, most wanted first: the multigpu tests (shutdown, graphs vs eager vs tp=1, the
# one-shot small all-reduce against NCCL), then on the Llama-3.1-8B shape batch-1 and batch-32
# decode at tp=1, tp=2 and tp=2 with the small all-reduce (gpu_idle: rank 0's GPU waiting for
# the host), "mixed" throughput at tp=1 and tp=2, and the Llama-3.1-70B shape at tp=2: batch-1
# and batch-8 decode against its roofline and TTFT at 1k.
# Every step runs on its own under a time limit, so one failure or overrun leaves the
# others' results; the random weights are written in the background while the tests run
# (the 70B folder only where /dev/shm has room for it), and nothing is timed until they are.
#
#   OUT=out bash benchmarks/tp_gpu_run.sh   (logs and JSON: $OUT/results.tgz, refreshed after every step)
#
# BUDGET (seconds, default 525) caps the whole run: a step gets what is left of it at most.
# SMALL / LARGE / GEN_DEVICE / MODEL_ROOT / DTYPE override the shapes and where weights are drawn
# and kept; BATCHES / LARGE_BATCHES / NEW_TOKENS / TTFT_LEN / REQUESTS / LENGTH_SCALE shrink the runs and
# SLOW multiplies every step's time limit. A CPU smoke run of the plumbing (BUDGET=1500):
#   SMALL=tiny LARGE=tiny GEN_DEVICE=cpu DTYPE=float32 BATCHES=1,2 LARGE_BATCHES=1,2 NEW_TOKENS=4 \
#   TTFT_LEN=64 REQUESTS=4 LENGTH_SCALE=0.05 SLOW=4
set -u
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMALL=${SMALL:-llama-3.1-8b}
GEN_DEVICE=${GEN_DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
ROOT=${MODEL_ROOT:-/dev/shm/kubellm-models}
BUDGET=${BUDGET:-525}
RES=$(mktemp -d)
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: output in NAME.log of the results
  local name=$1 limit=$(($2 * ${SLOW:-1})) left=$((BUDGET - (SECONDS - START) - 5))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then echo "=== $name SKIPPED (budget spent)"; return 1; fi
  echo "=== $name (t=$((SECONDS - START)) s, limit $limit s): $*"
  local status=0
  timeout -k 5 "$limit" "$@" >"$RES/$name.log" 2>&1 || status=$?
  tail -n 25 "$RES/$name.log"
  [ $status = 0 ] || echo "=== $name FAILED (exit $status)"
  tar czf "$OUT/results.tgz" -C "$RES" .
  return $status
}

{
  nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>/dev/null
  nvidia-smi topo -m 2>/dev/null
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
torch.cuda.device_count(), "GPUs, nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)'
  echo "commit ${KUBELLM_COMMIT:-unknown}"
} >"$RES/machine.log" 2>&1
cat "$RES/machine.log"

# The weights are written on GPU 1 while the tests run: 8B first, then 70B if it fits in RAM.
LARGE=${LARGE:-llama-3.1-70b}
LARGE_GB=${LARGE_GB:-150}
mkdir -p "$ROOT"
write_models() {
  CUDA_VISIBLE_DEVICES=1 $PY -m benchmarks.gpu_random_model --model "$SMALL" --model-root "$ROOT" \
    --device "$GEN_DEVICE" || return 1
  local free_gb=$(($(df -k --output=avail "$ROOT" | tail -n 1) / 1048576))
  if [ "$LARGE" != "$SMALL" ] && [ "$free_gb" -lt "$LARGE_GB" ]; then
    echo "$LARGE not written: $free_gb GB free in $ROOT, it needs $LARGE_GB"
    return 0
  fi
  [ "$LARGE" = "$SMALL" ] || CUDA_VISIBLE_DEVICES=1 $PY -m benchmarks.gpu_random_model --model "$LARGE" \
    --model-root "$ROOT" --device "$GEN_DEVICE" --shards 16
}
write_models >"$RES/write_models.log" 2>&1 &
WRITER=$!

step tests_multigpu 180 $PY -m pytest -q -s -p no:cacheprovider -o addopts="" -m multigpu \
  tests/test_tensor_parallel_gpu.py
# The writer (CPU threads, and GPU 1) must be done before anything is timed: it gets WRITE_WAIT
# more seconds, then the 70B folder is given up.
deadline=$((SECONDS + ${WRITE_WAIT:-90}))
while kill -0 $WRITER 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 2; done
if kill -0 $WRITER 2>/dev/null; then
  echo "=== weights not written in time (t=$((SECONDS - START)) s): the $LARGE run is left out"
  pkill -P $WRITER; kill $WRITER; wait $WRITER
  rm -rf "${ROOT:?}/$LARGE"
fi
cat "$RES/write_models.log"

S=(--model "$SMALL" --model-root "$ROOT" --dtype "$DTYPE")
NEW_TOKENS=${NEW_TOKENS:-64}
LAT=(--batches "${BATCHES:-1,32}" --prompt-len 128 --new-tokens "$NEW_TOKENS" --ttft-lens "${TTFT_LEN:-1024}")
step latency_tp1 55 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --out "$RES/latency_tp1.json"
step latency_tp2 60 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --tensor-parallel-size 2 \
  --out "$RES/latency_tp2.json"
step latency_tp2_small_all_reduce 60 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --tensor-parallel-size 2 \
  --small-all-reduce --out "$RES/latency_tp2_small_all_reduce.json"
for tp in 1 2; do
  step "throughput_tp$tp" 120 $PY -m benchmarks.throughput "${S[@]}" --systems kubellm --workload mixed \
    --num-requests "${REQUESTS:-64}" --tensor-parallel-size $tp --length-scale "${LENGTH_SCALE:-1}" \
    --out "$RES/throughput_tp$tp.json"
done
if [ -f "$ROOT/$LARGE/model.safetensors.index.json" ]; then
  # Each GPU holds half of the 70B weights (~71 GB): the KV cache gets the rest.
  [ "$LARGE" = "$SMALL" ] || rm -rf "${ROOT:?}/$SMALL"
  step latency_70b_tp2 200 $PY -m benchmarks.latency --model "$LARGE" --model-root "$ROOT" --dtype "$DTYPE" \
    --batches "${LARGE_BATCHES:-1,8}" --prompt-len 128 --new-tokens "$NEW_TOKENS" \
    --ttft-lens "${TTFT_LEN:-1024}" --tensor-parallel-size 2 --out "$RES/latency_70b_tp2.json"
fi
echo "=== done (t=$((SECONDS - START)) s)"
