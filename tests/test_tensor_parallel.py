"""Tensor parallelism on CPU with gloo.

First the plumbing on its own (process launch, supervision, step broadcast,
shutting down), with a probe runner in place of a ModelRunner: every rank
returns a digest of the step inputs it received, gathered to rank 0. Then the
whole engine: tp=2 gives the same greedy tokens as tp=1 (fp32) through
batching, chunked prefill, preemption and prefix caching, a killed worker fails
the engine cleanly, and an LLM going out of scope stops its workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine import LLM, EngineConfig, SamplingParams
from engine.async_engine import AsyncLLMEngine
from engine.distributed import Executor, check_tensor_parallel, parallel_state
from engine.distributed import executor as executor_module
from engine.errors import ConfigError, EngineDeadError
from engine.layers.embedding import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.weights import CheckpointSlice
from engine.model_config import load_model_config
from engine.testing.factory import write_random_weights
from server_harness import spawned_children

PROBE_FIELDS = ("ids", "table", "mask", "weights", "count", "flag", "absent", "crash_rank", "stall_rank")


class ProbeRunner:
    """execute_model: each rank's digest of its fields, all-gathered; `crash_rank` exits that rank
    mid-step, `stall_rank` never finishes its step."""

    def __init__(self, config: SimpleNamespace):
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def prepare_step(self, batch: dict) -> dict:
        return batch

    def execute_model(self, fields: dict) -> list[torch.Tensor]:
        digest = _digest_step(fields)
        if fields["crash_rank"] == self.rank:
            os._exit(3)
        if fields["stall_rank"] == self.rank:
            threading.Event().wait()
        if not dist.is_initialized():
            return [digest]
        gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, digest)
        return gathered

    def sample(self, result: list[torch.Tensor], batch: dict) -> list[torch.Tensor]:
        return result

    def receive_sampled(self, fields: dict) -> None:
        """Rank 0 shares nothing from its sample()."""


class FailsOnRankOne(ProbeRunner):
    def __init__(self, config: SimpleNamespace):
        super().__init__(config)
        if self.rank == 1:
            raise ValueError("rank 1 cannot load its shard")


def _digest_step(fields: dict) -> torch.Tensor:
    return torch.cat([_digest(fields[name]) for name in PROBE_FIELDS])


def _digest(value: object) -> torch.Tensor:
    if value is None:
        return torch.tensor([-1.0], dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        shape = torch.tensor(value.shape, dtype=torch.float64)
        return torch.cat([shape, value.to(torch.float64).flatten(), torch.tensor([float(value.dtype.itemsize)])])
    return torch.tensor([float(value), float(isinstance(value, bool))], dtype=torch.float64)


def _probe_step(seed: int, crash_rank: int = -1, stall_rank: int = -1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = seed % 5  # 0 gives empty tensors
    return {
        "ids": torch.randint(0, 1000, (num_tokens,), generator=generator),
        "table": torch.randint(0, 50, (2, 3 + seed), generator=generator, dtype=torch.int32),
        "mask": torch.rand(3, generator=generator) > 0.5,
        # seed 5: 40 KB, more than fits in the channel's first broadcast
        "weights": torch.randn(2, 2 if seed < 5 else 10_000, generator=generator).to(torch.bfloat16),
        "count": seed * 1000 + 7,
        "flag": seed % 2 == 0,
        "absent": None,
        "crash_rank": crash_rank,
        "stall_rank": stall_rank,
    }


def _config(tp: int) -> SimpleNamespace:
    return SimpleNamespace(tensor_parallel_size=tp, device="cpu")


@pytest.fixture
def probe_executor():
    executor = Executor(_config(2), ProbeRunner, PROBE_FIELDS)
    yield executor
    executor.shutdown()
    assert not dist.is_initialized()


def _assert_gone(pids: dict[int, int]) -> None:
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_every_rank_receives_the_same_step_inputs(probe_executor):
    for seed in range(6):
        digests = probe_executor.execute(_probe_step(seed))
        assert len(digests) == 2
        torch.testing.assert_close(digests[1], digests[0], rtol=0, atol=0)
        torch.testing.assert_close(digests[0], _digest_step(_probe_step(seed)), rtol=0, atol=0)


def test_a_worker_dying_inside_a_collective_fails_the_step_instead_of_hanging(probe_executor):
    pids = probe_executor.worker_pids
    with pytest.raises(EngineDeadError, match="exited with code 3"):
        probe_executor.execute(_probe_step(3, crash_rank=1))
    with pytest.raises(EngineDeadError):
        probe_executor.execute(_probe_step(4))
    _assert_gone(pids)


def test_a_worker_failing_at_start_up_is_reported_with_its_error():
    with pytest.raises(EngineDeadError, match="rank 1 cannot load its shard"):
        Executor(_config(2), FailsOnRankOne, PROBE_FIELDS)
    assert not dist.is_initialized()


# Shutting down -----------------------------------------------------------------------------


def test_leaving_releases_the_captures_once_before_destroying_the_groups():
    parallel_state.init_distributed(0, 1, parallel_state.create_store(1), "cpu")
    released = []
    parallel_state.release_before_teardown(lambda: released.append(dist.is_initialized()))
    assert parallel_state.destroy_distributed(coordinated=True)
    assert released == [True] and not dist.is_initialized()


def test_a_stuck_teardown_stage_is_left_behind_at_its_deadline(monkeypatch):
    monkeypatch.setattr(parallel_state, "TEARDOWN_TIMEOUT_S", 0.2)
    monkeypatch.setattr(parallel_state, "ABORT_TIMEOUT_S", 0.2)
    parallel_state.init_distributed(0, 1, parallel_state.create_store(1), "cpu")
    stuck = threading.Event()
    parallel_state.release_before_teardown(stuck.wait)
    try:
        assert parallel_state.destroy_distributed(coordinated=True) is False
        assert not dist.is_initialized()  # aborted instead: another engine can start
    finally:
        stuck.set()


@pytest.mark.slow
def test_the_executor_starts_and_stops_three_times_in_one_process():
    for ending in ("shutdown", "garbage collected", "worker killed"):
        probe = Executor(_config(2), ProbeRunner, PROBE_FIELDS)
        assert len(probe.execute(_probe_step(1))) == 2
        pids = probe.worker_pids
        if ending == "shutdown":
            probe.shutdown()
            with pytest.raises(EngineDeadError, match="shut down"):
                probe.execute(_probe_step(2))
        elif ending == "garbage collected":
            del probe
        else:
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="rank 1"):
                probe.execute(_probe_step(2))
            probe.shutdown()
        _assert_gone(pids)
        assert not dist.is_initialized()


def test_shutdown_stops_the_ranks_when_a_step_never_finishes(monkeypatch):
    monkeypatch.setattr(executor_module, "STEP_WAIT_S", 0.5)
    probe = Executor(_config(2), ProbeRunner, PROBE_FIELDS)
    pids = probe.worker_pids
    failures = []

    def stalled_step() -> None:
        try:
            probe.execute(_probe_step(1, stall_rank=1))
        except EngineDeadError as error:
            failures.append(error)

    step = threading.Thread(target=stalled_step)
    step.start()
    while probe._ranks.step_lock.acquire(blocking=False):  # until the step holds the channel
        probe._ranks.step_lock.release()
        time.sleep(0.01)
    probe.shutdown()
    step.join(60)
    assert failures and not step.is_alive()
    _assert_gone(pids)
    assert not dist.is_initialized()


def test_tp1_runs_in_process_without_workers():
    executor = Executor(_config(1), ProbeRunner, PROBE_FIELDS)
    assert executor.worker_pids == {}
    assert len(executor.execute(_probe_step(2))) == 1
    executor.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("tp", "heads", "kv_heads", "mlp", "message"),
    [
        (3, 4, 2, 64, "4 attention heads"),
        (2, 4, 3, 64, "3 KV heads"),
        (4, 8, 3, 64, "multiple of the model's 3 KV heads"),
        (2, 4, 2, 63, "MLP width 63"),
    ],
)
def test_shapes_that_do_not_split_fail_with_a_clear_message(tp, heads, kv_heads, mlp, message):
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(tp, "cpu", heads, kv_heads, mlp)


def test_kv_heads_fewer_than_ranks_are_replicated_not_rejected():
    check_tensor_parallel(4, "cpu", 8, 2, 64)


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="needs fewer than 64 visible GPUs")
def test_more_ranks_than_gpus_fails_at_start():
    with pytest.raises(ConfigError, match="needs 64 GPUs"):
        check_tensor_parallel(64, "cuda", 64, 64, 64)


# Sharded weight loading -----------------------------------------------------------------------


class RecordingSlice:
    """A real safetensors slice that records which parts of the tensor were read."""

    def __init__(self, lazy_slice):
        self.lazy_slice = lazy_slice
        self.reads = []

    def get_shape(self):
        return self.lazy_slice.get_shape()

    def __getitem__(self, index):
        self.reads.append(index)
        return self.lazy_slice[index]


@pytest.mark.parametrize(
    ("layer_class", "dim"), [(ColumnParallelLinear, 0), (RowParallelLinear, 1), (ParallelLMHead, 0)]
)
def test_each_rank_reads_only_its_shard_from_the_checkpoint(tmp_path, layer_class, dim):
    full = torch.randn(12, 8)
    save_file({"w": full}, tmp_path / "w.safetensors")
    shards = []
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as reader:
        for rank in range(2):
            args = (12, 8) if layer_class is ParallelLMHead else (full.shape[1], full.shape[0])
            layer = layer_class(*args, tp_rank=rank, tp_size=2)
            recording = RecordingSlice(reader.get_slice("w"))
            layer.weight.weight_loader(layer.weight, CheckpointSlice(recording), None)
            (index,) = recording.reads
            wanted = index[dim] if isinstance(index, tuple) else index
            part = full.shape[dim] // 2
            assert wanted == slice(part * rank, part * (rank + 1))
            shards.append(layer.weight.detach())
    assert torch.equal(torch.cat(shards, dim=dim), full)


@pytest.mark.parametrize(("kv_heads", "tp"), [(4, 2), (8, 4), (2, 4), (2, 2)])
def test_qkv_shards_hold_their_query_heads_and_the_kv_heads_those_attend_to(kv_heads, tp):
    heads, head_dim, hidden = 8, 4, 16
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (heads, kv_heads, kv_heads))
    group = heads // kv_heads  # query heads per KV head
    for rank in range(tp):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, tp_rank=rank, tp_size=tp)
        for shard_id, full in zip("qkv", (q, k, v)):
            layer.weight.weight_loader(layer.weight, full, shard_id)
        local_q, local_k, local_v = layer.weight.detach().split([layer.q_size, layer.kv_size, layer.kv_size])
        my_heads = range(rank * heads // tp, (rank + 1) * heads // tp)
        my_kv_heads = sorted({h // group for h in my_heads})
        assert torch.equal(local_q, q.view(heads, head_dim, hidden)[list(my_heads)].flatten(0, 1))
        assert torch.equal(local_k, k.view(kv_heads, head_dim, hidden)[my_kv_heads].flatten(0, 1))
        assert torch.equal(local_v, v.view(kv_heads, head_dim, hidden)[my_kv_heads].flatten(0, 1))


# The whole engine --------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Small enough that 12 sequences preempt each other, prompts are prefilled in chunks and
# half the prompts reuse a cached 32-token prefix.
ENGINE_ARGS = dict(device="cpu", num_kv_blocks=24, block_size=8, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 400, (32,), generator=generator).tolist()
    lengths = torch.randint(1, 90, (12,), generator=generator).tolist()
    tails = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in lengths]
    return [shared + tail if i % 2 else tail for i, tail in enumerate(tails)]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [output.outputs[0].token_ids for output in outputs]


@pytest.fixture(scope="module")
def llama_with_4_kv_heads(tiny_model_folder, tmp_path_factory) -> Path:
    """The tiny llama with 4 KV heads, so that each of 2 ranks holds more than one."""
    folder = Path(shutil.copytree(tiny_model_folder("llama"), tmp_path_factory.mktemp("kv4") / "model"))
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_key_value_heads": 4}))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    write_random_weights(folder, load_model_config(folder), seed=0, dtype=torch.float32, shards=1)
    return folder


@pytest.mark.parametrize("model", [
    "llama", "qwen2", "llama with 4 KV heads", "llama without overlap scheduling",
    # Experts split by their intermediate dimension; Gemma 3's local/global layers (~2 min each on 2 cores).
    pytest.param("qwen3_moe", marks=pytest.mark.slow), pytest.param("gemma3", marks=pytest.mark.slow),
])
def test_tp2_generates_the_same_greedy_tokens_as_tp1(tiny_model_folder, llama_with_4_kv_heads, prompts, model):
    """With overlap scheduling (the default) the workers' placeholders come from rank 0's broadcast."""
    path = str(llama_with_4_kv_heads if model == "llama with 4 KV heads" else tiny_model_folder(model.split()[0]))
    expected = _generate(LLM(model=path, **ENGINE_ARGS), prompts)
    overlap = model != "llama without overlap scheduling"
    llm = LLM(model=path, tensor_parallel_size=2, overlap_scheduling=overlap, **ENGINE_ARGS)
    try:
        assert _generate(llm, prompts) == expected
        assert _generate(llm, prompts) == expected  # again, now from prefix-cached blocks
        stats = llm.get_stats()
        assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0 and stats.prefix_cache_hits > 0
        kv_heads = llm.llm_engine.model_config.num_key_value_heads
        assert llm.llm_engine.core.model_runner.kv_cache.shape[-2] == kv_heads // 2  # this rank's share only
    finally:
        llm.llm_engine.shutdown()
    assert not dist.is_initialized()


def test_a_worker_killed_mid_run_fails_the_engine_cleanly(tiny_model_folder, prompts):
    llm = LLM(model=str(tiny_model_folder("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts[:4]):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    pids = engine.core.executor.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank 1"):
        while engine.has_unfinished_requests():
            engine.step()
    with pytest.raises(EngineDeadError, match="rank 1"):
        engine.check_health()
    engine.shutdown()
    _assert_gone(pids)
    assert not dist.is_initialized()


def test_an_llm_going_out_of_scope_stops_its_workers(tiny_model_folder, prompts):
    def generate_once() -> dict[int, int]:
        llm = LLM(model=str(tiny_model_folder("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
        _generate(llm, prompts[:2])
        return llm.llm_engine.core.executor.worker_pids

    pids = generate_once()
    _assert_gone(pids)
    assert not dist.is_initialized()


SCRIPT_THAT_NEVER_SHUTS_DOWN = """
import sys
from engine import LLM, SamplingParams
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, device="cpu", num_kv_blocks=24, block_size=8)
llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
print(*llm.llm_engine.core.executor.worker_pids.values(), flush=True)
"""


@pytest.mark.slow
def test_a_script_that_never_shuts_down_its_llm_still_exits(tiny_model_folder):
    """The interpreter's exit stops the workers (before multiprocessing's own exit handler)."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT_THAT_NEVER_SHUTS_DOWN, str(tiny_model_folder("llama"))],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    _assert_gone({rank: int(pid) for rank, pid in enumerate(done.stdout.split(), start=1)})


@pytest.mark.asyncio
async def test_a_worker_dying_while_the_server_idles_fails_health(tiny_model_folder):
    """The server's core process is rank 0 and starts rank 1; its idle loop notices rank 1's death by itself."""
    config = EngineConfig(model=str(tiny_model_folder("llama")), tensor_parallel_size=2, **ENGINE_ARGS)
    front = AsyncLLMEngine(config)
    front.start()
    await front.wait_until_loaded()
    outputs = [o async for o in front.generate("r", "Hello", GREEDY)]
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids
    core = front.client.core_pid
    workers = spawned_children(core)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    while front.is_alive:
        await asyncio.sleep(0.05)
    assert isinstance(front.error, EngineDeadError) and "rank 1" in str(front.error)
    with pytest.raises(EngineDeadError):
        front.check_accepting()
    front.stop()
    _assert_gone({0: core, 1: workers[0]})


def test_heads_that_do_not_split_fail_at_start(tiny_model_folder):
    with pytest.raises(ConfigError, match="4 attention heads"):
        LLM(model=str(tiny_model_folder("llama")), tensor_parallel_size=3, device="cpu")
