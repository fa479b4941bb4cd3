"""Tensor parallelism with NCCL and CUDA graphs on two GPUs (skipped with fewer).

The CPU suite (gloo) cannot capture graphs: this is where the all-reduces
inside the decode graphs run, and where shutting down must end although NCCL
waits for every graph that captured one of its collectives. Run with -s to
see the start and stop times.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

# fp32, so that greedy tokens are comparable across tp sizes and between graphs and eager mode.
ENGINE_ARGS = dict(device="cuda", dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=8, max_model_len=512)
PROMPTS = [[5, 17, 99, 3], [42] * 37, list(range(20, 90)), [7]]
# What "a few seconds" means for one shutdown: a hang is what this guards against.
SHUTDOWN_LIMIT_S = 5.0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from engine.testing import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny") / "model", family="llama", size="tiny")


def _llm(folder, tp: int, **overrides):
    from engine import LLM

    return LLM(model=str(folder), tensor_parallel_size=tp, **{**ENGINE_ARGS, **overrides})


def _greedy(llm) -> list[list[int]]:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _assert_gone(pids: dict[int, int]) -> None:
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tp2_with_cuda_graphs_starts_and_stops_three_times_in_one_process(tiny_folder):
    runs = []
    for ending in ("shutdown", "shutdown", "out of scope"):
        start = time.perf_counter()
        llm = _llm(tiny_folder, 2)
        graphs = llm.llm_engine.core.model_runner.cuda_graphs
        assert graphs.decode.graphs and graphs.mixed.graphs  # captured, all-reduces inside
        runs.append(_greedy(llm))
        pids = llm.llm_engine.core.executor.worker_pids
        stop = time.perf_counter()
        if ending == "shutdown":
            llm.llm_engine.shutdown()
        else:
            del llm
        stopped = time.perf_counter()
        print(f"tp=2 with CUDA graphs: start + generate {stop - start:.1f} s, {ending} {stopped - stop:.2f} s")
        assert stopped - stop < SHUTDOWN_LIMIT_S
        _assert_gone(pids)
        assert not dist.is_initialized()
    assert runs[0] == runs[1] == runs[2]


def test_tp2_graphs_give_the_greedy_tokens_of_tp2_eager_and_of_tp1(tiny_folder):
    expected = _greedy(_llm(tiny_folder, 1))
    for enforce_eager in (True, False):
        llm = _llm(tiny_folder, 2, enforce_eager=enforce_eager)
        try:
            assert _greedy(llm) == expected, f"enforce_eager={enforce_eager}"
        finally:
            llm.llm_engine.shutdown()


def test_a_rank_killed_mid_run_fails_the_engine_and_the_next_one_starts(tiny_folder):
    from engine import SamplingParams
    from engine.distributed.executor import DEATH_NOTICE_S
    from engine.distributed.parallel_state import ABORT_TIMEOUT_S
    from engine.errors import EngineDeadError

    llm = _llm(tiny_folder, 2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    for _ in range(3):
        engine.step()  # prefill, then decode steps from the graphs
    pids = engine.core.executor.worker_pids
    killed = time.perf_counter()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="rank 1"):
        while engine.has_unfinished_requests():
            engine.step()
    engine.shutdown()
    print(f"tp=2 with CUDA graphs: from killing rank 1 to the engine stopped {time.perf_counter() - killed:.2f} s")
    # The death is noticed in milliseconds; the abort has ABORT_TIMEOUT_S, and a step stuck in
    # a collective DEATH_NOTICE_S more.
    assert time.perf_counter() - killed < DEATH_NOTICE_S + ABORT_TIMEOUT_S + SHUTDOWN_LIMIT_S
    _assert_gone(pids)
    assert not dist.is_initialized()
    del llm, engine

    again = _llm(tiny_folder, 2)
    try:
        assert len(_greedy(again)) == len(PROMPTS)
    finally:
        again.llm_engine.shutdown()


# The one-shot all-reduce for small messages (engine.distributed.small_all_reduce) ----------------


def _small_all_reduce_rank(rank: int, port: int, failures) -> None:
    """One rank: the one-shot sum equals NCCL's, eagerly and replayed from a CUDA graph."""
    from engine.distributed import parallel_state, small_all_reduce

    try:
        parallel_state.init_distributed(rank, 2, parallel_state.connect_store(port, 2), "cuda")
        device = torch.device("cuda", rank)
        for dtype in (torch.float32, torch.bfloat16):
            assert small_all_reduce.enable(device, dtype), "symmetric memory could not be set up"
            small = small_all_reduce.active()
            generator = torch.Generator(device=device).manual_seed(rank)
            for shape in ((1, 4096), (7, 1000), (32, 4096), (small_all_reduce.MAX_BYTES // dtype.itemsize,)):
                x = torch.randn(shape, generator=generator, device=device).to(dtype)
                assert small.can_reduce(x)
                expected = x.clone()
                dist.all_reduce(expected)
                torch.testing.assert_close(small(x), expected)
            static = torch.randn(8, 4096, device=device, dtype=dtype)
            small(static)  # warm-up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = small(small(static) * 0.5)
            for _ in range(3):
                static.copy_(torch.randn(8, 4096, generator=generator, device=device).to(dtype))
                expected = static.clone()
                dist.all_reduce(expected)
                expected *= 0.5
                dist.all_reduce(expected)
                graph.replay()
                torch.testing.assert_close(out, expected)
            graph.reset()
            small_all_reduce._release()
        parallel_state.destroy_distributed(coordinated=True)
    except BaseException as error:  # noqa: BLE001 - reported to the test process
        failures.put(f"rank {rank}: {error!r}")
        raise


def test_one_shot_small_all_reduce_equals_nccl_eagerly_and_in_graphs():
    import multiprocessing

    from engine.distributed import parallel_state

    store = parallel_state.create_store(2)  # served from here; both ranks connect to it
    context = multiprocessing.get_context("spawn")
    failures = context.Queue()
    ranks = [context.Process(target=_small_all_reduce_rank, args=(rank, store.port, failures)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    errors = [failures.get() for _ in range(failures.qsize())]
    assert not errors, errors
    assert [p.exitcode for p in ranks] == [0, 0]


def test_tp2_with_the_small_all_reduce_gives_the_greedy_tokens_of_tp1(tiny_folder):
    from engine.distributed import small_all_reduce

    expected = _greedy(_llm(tiny_folder, 1))
    llm = _llm(tiny_folder, 2, small_all_reduce=True)
    try:
        assert small_all_reduce.active() is not None, "fell back to NCCL (see the log for why)"
        graphs = llm.llm_engine.core.model_runner.cuda_graphs
        assert graphs.decode.graphs and graphs.mixed.graphs  # the one-shot kernel captured in both
        assert _greedy(llm) == expected
    finally:
        llm.llm_engine.shutdown()
    assert small_all_reduce.active() is None
