#!/usr/bin/env bash
# Tensor-parallel GPU runs behind benchmarks/RESULTS.md, packed for one 2 x H200 command of
# under 9 minutes: the multigpu tests (start/stop three times with CUDA graphs, graphs vs
# eager vs tp=1, a rank killed), then on the Llama-3.1-8B shape: batch-1 and batch-32 decode
# at tp=1 and tp=2, tp=2 in eager mode (what the all-reduces captured in the decode graphs
# buy), bf16 agreement of tp=2 with tp=1, "mixed" throughput at tp=1 and tp=2, and the
# seed example (fp16, sampled, never shut down) at tp=2.
# Every step runs on its own under a time limit, so one failure or overrun leaves the
# others' results; the most wanted run first.
#
#   OUT=out bash benchmarks/tp_gpu_run.sh   (logs and JSON: $OUT/results.tgz, refreshed after every step)
#
# BUDGET (seconds, default 525) caps the whole run: a step gets what is left of it at most.
# SMALL / GEN_DEVICE / MODEL_ROOT / DTYPE override the shape and where weights are drawn and
# kept (a CPU smoke run of the plumbing: SMALL=tiny GEN_DEVICE=cpu DTYPE=float32).
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
  local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START) - 5))
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

# The 8B folder is written on GPU 1 while the tests run.
CUDA_VISIBLE_DEVICES=1 $PY -m benchmarks.gpu_random_model --model "$SMALL" --model-root "$ROOT" \
  --device "$GEN_DEVICE" >"$RES/write_model.log" 2>&1 &
WRITER=$!

step tests_multigpu 160 $PY -m pytest -q -s -p no:cacheprovider -o addopts="" -m multigpu \
  tests/test_tensor_parallel_gpu.py
wait $WRITER; cat "$RES/write_model.log"

S=(--model "$SMALL" --model-root "$ROOT" --dtype "$DTYPE")
LAT=(--batches 1,32 --prompt-len 128 --new-tokens 64 --ttft-lens 1024)
step latency_tp1 60 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --out "$RES/latency_tp1.json"
step latency_tp2 70 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --tensor-parallel-size 2 \
  --out "$RES/latency_tp2.json"
step latency_tp2_eager 60 $PY -m benchmarks.latency "${S[@]}" "${LAT[@]}" --tensor-parallel-size 2 \
  --enforce-eager --out "$RES/latency_tp2_eager.json"
step agreement_tp2 100 $PY -m benchmarks.tp_agreement "${S[@]}" --sizes 2 --num-prompts 8 \
  --new-tokens 32 --out "$RES/agreement_tp2.json"
for tp in 1 2; do
  step "throughput_tp$tp" 60 $PY -m benchmarks.throughput "${S[@]}" --systems kubellm --workload mixed \
    --num-requests "${REQUESTS:-64}" --tensor-parallel-size $tp --length-scale "${LENGTH_SCALE:-1}" \
    --out "$RES/throughput_tp$tp.json"
done
# The example users start from, which never shuts down: its process must still end.
step seed_example_tp2 60 $PY -m benchmarks.tp_seed_example --model "$SMALL" --model-root "$ROOT"
echo "=== done (t=$((SECONDS - START)) s)"
