"""The pure parts of the benchmark analyses: kernel-trace grouping and the per-step roofline.

Figures here are worked out by hand from small synthetic inputs.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.kernel_trace import STEP_MARKER, cpu_activities, family_of, step_windows, summarize_trace
from benchmarks.quant_gpu import sweep_candidates
from benchmarks.roofline import Chunk, ModelCost, model_cost, simulate_schedule, step_roofline_seconds
from benchmarks.workloads import Request
from engine.block_manager import BlockManager
from engine.core_messages import EngineCoreRequest
from engine.sampling import SamplingParams
from engine.scheduler import SampledTokens, Scheduler
from engine.sequence import Request as EngineRequest


@pytest.mark.parametrize("name, family", [
    ("nvjet_tst_128x64_64x6_1x1_v_bz_coopB_TNT", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("_rms_norm_kernel", "norm"),
    ("_rotary_kernel", "rotary"),
    ("_store_kvcache_kernel", "cache write"),
    ("_decode_kernel", "attention"),
    ("_merge_splits_kernel", "attention"),
    ("_silu_and_mul_kernel", "activation"),
    ("_quantize_per_token_kernel", "FP8 activation quantization"),
    ("_rms_norm_fp8_kernel", "norm"),  # quantizing in the norm's launch: the launch is the norm's
    ("_silu_and_mul_fp8_kernel", "activation"),
    ("_fp8_matmul_kernel", "GEMM"),
    ("_dequantize_kernel", "GEMM"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-reduce/NCCL"),
    ("void c10d::symmetric_memory::one_shot_all_reduce_kernel<c10::BFloat16, 2>", "all-reduce/NCCL"),
    ("c10d::allgather_", "all-reduce/NCCL"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::ArgMaxOps<float>>>",
     "sampler"),
    ("Memcpy HtoD (Pinned -> Device)", "copy/memset"),
    ("aten::mm", "GEMM"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::index_copy_", "cache write"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise/other"),
])
def test_kernel_names_fall_in_their_family(name, family):
    assert family_of(name) == family


def _event(cat: str, name: str, ts: float, dur: float, **args) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 7, "args": args}


def test_gpu_activities_are_charged_to_the_step_that_launched_them():
    events = [
        _event("user_annotation", STEP_MARKER, 0, 100),
        _event("user_annotation", STEP_MARKER, 100, 100),
        # step 0 launches a graph of two kernels (one correlation id) and a copy
        _event("cuda_runtime", "cudaGraphLaunch", 10, 5, correlation=1),
        _event("kernel", "nvjet_tst_gemm", 20, 30, correlation=1),
        _event("kernel", "_rms_norm_kernel", 50, 10, correlation=1),
        _event("cuda_runtime", "cudaMemcpyAsync", 16, 2, correlation=2),
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 60, 4, correlation=2),
        # step 1 launches a GEMM that runs after its window, overlapping a kernel on another stream
        _event("cuda_driver", "cuLaunchKernel", 150, 3, correlation=3),
        _event("kernel", "nvjet_tst_gemm", 160, 50, correlation=3),
        _event("cuda_runtime", "cudaLaunchKernel", 151, 3, correlation=4),
        _event("kernel", "ncclDevKernel_AllReduce", 200, 20, correlation=4),
        # launched before the first step: not counted
        _event("cuda_runtime", "cudaLaunchKernel", -5, 1, correlation=5),
        _event("kernel", "_decode_kernel", 1, 5, correlation=5),
    ]
    summary = summarize_trace(events)
    assert summary["source"] == "gpu" and summary["steps"] == 2
    assert summary["wall_us"] == 100
    assert summary["kernel_us"] == (30 + 10 + 4 + 50 + 20) / 2
    assert summary["busy_us"] == (44 + 60) / 2  # step 1: [160, 220)
    assert summary["idle_us"] == 100 - 52
    assert summary["launches_per_step"] == 2.5
    families = {row["name"]: row for row in summary["families"]}
    assert list(families) == ["GEMM", "all-reduce/NCCL", "norm", "copy/memset"]  # by time
    assert families["GEMM"]["launches_per_step"] == 1 and families["GEMM"]["us_per_step"] == 40
    assert families["GEMM"]["mean_us"] == 40 and families["GEMM"]["share_of_wall"] == 0.4
    assert summary["top_kernels"][0] == {"name": "nvjet_tst_gemm", "launches_per_step": 1, "us_per_step": 40,
                                         "share_of_wall": 0.4, "mean_us": 40}


def test_cpu_ops_count_their_own_time_only():
    events = [
        _event("user_annotation", STEP_MARKER, 0, 100),
        _event("cpu_op", "aten::linear", 10, 50),
        _event("cpu_op", "aten::t", 10, 5),
        _event("cpu_op", "aten::addmm", 20, 35),
        _event("cpu_op", "aten::empty", 22, 3),
        _event("cpu_op", "aten::argmax", 70, 10),
        {**_event("cpu_op", "aten::mul", 30, 5), "tid": 8},  # another thread
    ]
    own = {a.name: a.self_us for a in cpu_activities(events, step_windows(events))}
    assert own == {"aten::linear": 10, "aten::t": 5, "aten::addmm": 32, "aten::empty": 3, "aten::argmax": 10}
    summary = summarize_trace(events)
    assert summary["source"] == "cpu ops" and summary["kernel_us"] == summary["busy_us"] == 60
    assert {row["name"]: row["us_per_step"] for row in summary["families"]} == {
        "GEMM": 42, "sampler": 10, "elementwise/other": 8}


def test_a_trace_without_steps_is_refused():
    with pytest.raises(ValueError, match="annotations"):
        summarize_trace([_event("kernel", "k", 0, 1, correlation=1)])


def _requests(lengths: list[tuple[int, int]]) -> list[Request]:
    return [Request(list(range(prompt)), output) for prompt, output in lengths]


def test_the_simulated_schedule_by_hand():
    # Budget 4, two sequences at most: a (3 in, 2 out) and b (5 in, 1 out); c (1 in, 1 out) waits for a slot.
    steps = simulate_schedule(_requests([(3, 2), (5, 1), (1, 1)]), max_num_seqs=2, max_num_batched_tokens=4)
    assert steps == [
        [Chunk(0, 3, True), Chunk(0, 1, False)],  # a's prompt, b's first chunk
        [Chunk(3, 1, True), Chunk(1, 3, False)],  # a decodes (and ends), b's next chunk
        [Chunk(4, 1, True), Chunk(0, 1, True)],  # b's last token (it ends), c takes a's slot
    ]


def test_the_simulated_schedule_is_the_schedulers():
    rng = random.Random(0)
    lengths = [(rng.randint(1, 40), rng.randint(1, 12)) for _ in range(30)]
    block_size, max_num_seqs, budget = 4, 5, 32
    scheduler = Scheduler(BlockManager(1000, block_size, False), max_num_seqs, budget, max_model_len=1000)
    for i, (prompt, output) in enumerate(lengths):
        ids = [1000 * i + t for t in range(prompt)]
        request = EngineCoreRequest(str(i), ids, SamplingParams(max_tokens=output, ignore_eos=True), 0.0, output)
        scheduler.add_request(EngineRequest(request))
    real = []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        real.append([Chunk(start, n, samples) for start, n, samples in zip(batch.starts, batch.num_new_tokens,
                                                                           batch.samples)])
        scheduler.update(batch, SampledTokens(np.full(len(batch.sampling_seqs), 7, dtype=np.int64)))
    assert simulate_schedule(_requests(lengths), max_num_seqs, budget) == real


def test_step_roofline_by_hand():
    # Weights 100 B (20 of them the lm_head), 8 B of K/V per token, 10 flops per attended pair, 1-byte dtype;
    # 1 byte and 2 flops per second.
    cost = ModelCost(weight_bytes=100, lm_head_bytes=20, expert_bytes=0, num_experts=0, top_k=0,
                     kv_bytes_per_token=8, attention_flops_per_pair=10, dtype_bytes=1)
    # One request, 4 prompt tokens then 2 outputs, budget 4: a prefill step, then one decode step.
    bound = step_roofline_seconds(_requests([(4, 2)]), cost, 1, 4, bandwidth_gbs=1e-9, peak_tflops=2e-12)
    # prefill: 100 + 8 * 4 = 132 B; 2 * 80 * 4 + 2 * 20 * 1 + 10 * (4 * 5 / 2) = 780 flops: 390 s, compute-bound
    # decode at position 4: 100 + 8 * 5 = 140 B: 140 s, memory-bound; 2 * 80 + 2 * 20 + 10 * 5 = 250 flops
    assert bound["steps"] == 2 and bound["compute_bound_steps"] == 1
    assert bound["memory_s"] == pytest.approx(132 + 140) and bound["compute_s"] == pytest.approx((780 + 250) / 2)
    assert bound["roofline_s"] == pytest.approx(390 + 140)
    assert bound["roofline_output_tok_s"] == pytest.approx(2 / 530)


def test_moe_steps_read_only_the_experts_their_tokens_can_reach():
    cost = model_cost("qwen3-30b-a3b")
    one = cost.step_bytes_flops(tokens=1, sampled=1, kv_tokens=0, pairs=0)
    many = cost.step_bytes_flops(tokens=4096, sampled=1, kv_tokens=0, pairs=0)
    unread = (cost.num_experts - cost.top_k) * cost.expert_bytes
    assert one[0] == pytest.approx(cost.weight_bytes - unread)
    assert many[0] == pytest.approx(cost.weight_bytes)
    assert many[1] == pytest.approx(one[1] + 2 * 4095 * (cost.weight_bytes - cost.lm_head_bytes - unread) / 2)


@pytest.mark.parametrize("m", [1, 16, 256])
def test_the_sweep_times_each_default_both_ways_of_adding_k_splits(m):
    candidates = sweep_candidates(m, {"defaults", "w4a16-gemv", "fp8-gemv"})
    assert len(candidates) == len(set(candidates))  # a default that is also a listed tile is timed once
    defaults = [(fmt, config) for fmt, config in candidates
                if (fmt, replace(config, reduce_in_kernel=not config.reduce_in_kernel)) in candidates]
    assert {fmt for fmt, _ in defaults} == ({"fp8", "w4a16"} if m <= 128 else {"fp8"})
