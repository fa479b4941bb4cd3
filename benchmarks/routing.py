"""Routing across replicas: the endpoint picker's scoring against random spreading.

Starts REPLICAS `kubellm serve` processes on 127.0.0.1 (same model, a small KV cache
each), then for each policy sends the same shared-system-prompt workload (SYSTEMS
system prompts, each request one of them plus its own question) at Poisson arrivals
through a router in this process, and reports per policy: the prefix-cache hit rate
(prompt tokens served from cache, from the replicas' kubellm_prefix_cache_* counters),
TTFT p50/p99 and errors. Replicas are restarted between policies (cold caches).

The router stands in for the Gateway API Inference Extension's endpoint picker, with
its documented default scheduling profile: queue-scorer (weight 1), kv-cache-scorer
(weight 1), prefix-cache-scorer (weight 3), max-score-picker (ties at random). Queue
and KV numbers come from the vllm:num_requests_waiting and vllm:kv_cache_usage_perc
gauges the engines serve for the picker, refreshed every 50 ms (its
--refresh-metrics-interval); the prefix scorer matches the prompt's leading blocks
against an LRU of the blocks it routed to each replica (the picker's approximate
prefix index; here over token ids in the engine's 16-token blocks, as prompts are
token ids). The product emits the real InferencePool for the real picker; this
harness only measures what that scoring buys.

    python -m benchmarks.routing --model tiny --num-requests 240 --out results/routing.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import print_table, save_json
from benchmarks.serving import RequestTiming, free_port, percentile, send, start_server
from benchmarks.workloads import MODEL_SHAPES, Request, model_folder, token_id_limit

WEIGHTS = {"queue": 1.0, "kv": 1.0, "prefix": 3.0}  # the picker's default scheduling profile
REFRESH_SECONDS = 0.05
BLOCK_TOKENS = 16  # kubellm serve's default --block-size
LRU_BLOCKS_PER_REPLICA = 31250  # the picker's default lruCapacityPerServer
WAITING, KV_USAGE = "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
HITS, QUERIES = "kubellm_prefix_cache_hits_total", "kubellm_prefix_cache_queries_total"


def shared_prefix_workload(vocab_size: int, num_requests: int, systems: int, system_len: int, question_len: int,
                           output_len: int, seed: int = 0) -> list[Request]:
    """Each request: one of `systems` system prompts (chosen at random, seeded) plus its own question."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab_size) for _ in range(system_len)] for _ in range(systems)]
    return [Request(rng.choice(prompts) + [rng.randrange(10, vocab_size) for _ in range(question_len)], output_len)
            for _ in range(num_requests)]


def block_hashes(token_ids: list[int]) -> list[str]:
    """Chained hashes of the prompt's full blocks: block i's hash covers every token before its end."""
    hashes, previous = [], ""
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hashlib.sha256(f"{previous}:{token_ids[start:start + BLOCK_TOKENS]}".encode()).hexdigest()
        hashes.append(previous)
    return hashes


@dataclass
class Replica:
    url: str
    waiting: float = 0.0
    kv_usage: float = 0.0
    routed_blocks: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU of block hashes

    def prefix_match(self, hashes: list[str]) -> float:
        """Fraction of the prompt's blocks, from the start, this replica was sent before."""
        matched = 0
        for block in hashes:
            if block not in self.routed_blocks:
                break
            matched += 1
        return matched / len(hashes) if hashes else 0.0

    def remember(self, hashes: list[str]) -> None:
        for block in hashes:
            self.routed_blocks[block] = None
            self.routed_blocks.move_to_end(block)
        while len(self.routed_blocks) > LRU_BLOCKS_PER_REPLICA:
            self.routed_blocks.popitem(last=False)


def queue_scores(replicas: list[Replica]) -> list[float]:
    """1 for the shortest queue, 0 for the longest, linear between; all 1 when equal."""
    queues = [replica.waiting for replica in replicas]
    low, high = min(queues), max(queues)
    return [1.0 if high == low else (high - queue) / (high - low) for queue in queues]


def picker_choice(replicas: list[Replica], request: Request, rng: random.Random) -> Replica:
    """The weighted sum of the three scorers; the highest wins, ties at random."""
    hashes = block_hashes(request.prompt_token_ids)
    scores = [WEIGHTS["queue"] * queue + WEIGHTS["kv"] * (1.0 - replica.kv_usage)
              + WEIGHTS["prefix"] * replica.prefix_match(hashes)
              for replica, queue in zip(replicas, queue_scores(replicas))]
    best = max(scores)
    chosen = rng.choice([replica for replica, score in zip(replicas, scores) if score == best])
    chosen.remember(hashes)
    return chosen


def random_choice(replicas: list[Replica], request: Request, rng: random.Random) -> Replica:
    return rng.choice(replicas)


POLICIES: dict[str, Callable[[list[Replica], Request, random.Random], Replica]] = {
    "picker": picker_choice, "random": random_choice}


def metric_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of the named samples in a Prometheus text exposition."""
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def refresh_metrics(clients: list[httpx.AsyncClient], replicas: list[Replica], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for client, replica in zip(clients, replicas):
            values = metric_values((await client.get("/metrics")).text, (WAITING, KV_USAGE))
            replica.waiting, replica.kv_usage = values[WAITING], values[KV_USAGE]
        await asyncio.sleep(REFRESH_SECONDS)


async def run_policy(urls: list[str], policy: str, requests: list[Request], rate: float,
                     seed: int) -> tuple[list[RequestTiming], list[int]]:
    """Send every request through the policy at Poisson arrivals; (timings, requests per replica)."""
    rng = random.Random(seed)
    replicas = [Replica(url) for url in urls]
    routed = [0] * len(replicas)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=None, limits=limits))
                   for url in urls]
        refresher = asyncio.create_task(refresh_metrics(clients, replicas, stop))
        tasks = []
        for request in requests:
            index = replicas.index(POLICIES[policy](replicas, request, rng))
            routed[index] += 1
            tasks.append(asyncio.create_task(send(clients[index], "bench", request)))
            await asyncio.sleep(rng.expovariate(rate))
        timings = await asyncio.gather(*tasks)
        stop.set()
        await refresher
    return list(timings), routed


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    """(hit tokens, looked-up tokens) summed over the replicas."""
    totals = [metric_values(httpx.get(f"{url}/metrics", timeout=10).text, (HITS, QUERIES)) for url in urls]
    return sum(total[HITS] for total in totals), sum(total[QUERIES] for total in totals)


def measure(folder: Path, policy: str, requests: list[Request], args: argparse.Namespace) -> dict:
    servers, urls = [], []
    try:
        for _ in range(args.replicas):
            port = free_port()
            servers.append(start_server(folder, port, args.server_args.split(), args.ready_timeout))
            urls.append(f"http://127.0.0.1:{port}")
        start = time.perf_counter()
        timings, routed = asyncio.run(run_policy(urls, policy, requests, args.rate, args.seed))
        wall_s = time.perf_counter() - start
        hits, queries = prefix_counters(urls)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    done = [timing for timing in timings if timing.error is None]
    return {"policy": policy, "requests": len(timings), "errors": len(timings) - len(done),
            "routed": "/".join(map(str, routed)), "prefix_hit_rate": hits / queries if queries else 0.0,
            "ttft_p50_ms": 1e3 * percentile([t.ttft_s for t in done], 50),
            "ttft_p99_ms": 1e3 * percentile([t.ttft_s for t in done], 99), "wall_s": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=240)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson arrivals)")
    parser.add_argument("--systems", type=int, default=12, help="distinct shared system prompts")
    parser.add_argument("--system-len", type=int, default=96, help="tokens per system prompt")
    parser.add_argument("--question-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--server-args", default="--dtype float32 --max-model-len 256 --max-num-seqs 4 "
                                                 "--num-kv-blocks 80",
                        help="`kubellm serve` arguments of each replica; a KV cache too small for every system "
                             "prompt is what makes placement matter")
    parser.add_argument("--policies", default="picker,random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    folder = model_folder(args.model, args.model_root)
    requests = shared_prefix_workload(token_id_limit(folder), args.num_requests, args.systems, args.system_len,
                                      args.question_len, args.output_len, args.seed)
    rows = []
    for policy in args.policies.split(","):
        rows.append(measure(folder, policy, requests, args))
        print(f"{policy}: prefix-cache hit rate {rows[-1]['prefix_hit_rate']:.1%}, "
              f"TTFT p50 {rows[-1]['ttft_p50_ms']:.1f} ms, p99 {rows[-1]['ttft_p99_ms']:.1f} ms", flush=True)
    print_table(rows, f"routing across {args.replicas} replicas: {args.model}, {args.num_requests} requests, "
                      f"{args.systems} system prompts of {args.system_len} tokens, {args.rate:g} req/s")
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), "server_args": args.server_args,
                         "rows": rows})


if __name__ == "__main__":
    main()
