"""Tensor parallelism on CPU with gloo: the executor, its workers and the step channel.

The probe runner below stands in for a ModelRunner so that the plumbing
(process launch, supervision, step broadcast) is tested on its own: every rank
returns a digest of the step inputs it received, gathered to rank 0.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from engine.distributed import Executor, check_tensor_parallel
from engine.errors import ConfigError, EngineDeadError

PROBE_FIELDS = ("ids", "table", "mask", "weights", "count", "flag", "absent", "crash_rank")


class ProbeRunner:
    """execute_model: each rank's digest of its fields, all-gathered; `crash_rank` exits that rank mid-step."""

    def __init__(self, config: SimpleNamespace):
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def prepare_step(self, batch: dict) -> dict:
        return batch

    def execute_model(self, fields: dict) -> list[torch.Tensor]:
        digest = _digest_step(fields)
        if fields["crash_rank"] == self.rank:
            os._exit(3)
        if not dist.is_initialized():
            return [digest]
        gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, digest)
        return gathered

    def sample(self, result: list[torch.Tensor], batch: dict) -> list[torch.Tensor]:
        return result


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


def _probe_step(seed: int, crash_rank: int = -1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = seed % 5  # 0 gives empty tensors
    return {
        "ids": torch.randint(0, 1000, (num_tokens,), generator=generator),
        "table": torch.randint(0, 50, (2, 3 + seed), generator=generator, dtype=torch.int32),
        "mask": torch.rand(3, generator=generator) > 0.5,
        "weights": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
        "count": seed * 1000 + 7,
        "flag": seed % 2 == 0,
        "absent": None,
        "crash_rank": crash_rank,
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


def test_a_worker_killed_between_steps_makes_the_engine_dead(probe_executor):
    probe_executor.execute(_probe_step(1))
    pids = probe_executor.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank 1"):
        probe_executor.execute(_probe_step(2))
    with pytest.raises(EngineDeadError, match="rank 1"):
        probe_executor.check_health()
    _assert_gone(pids)
    assert not dist.is_initialized()


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
