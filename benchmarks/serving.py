"""Online serving: Poisson arrivals at several request rates against `kubellm serve`.

Starts the server on the model (or targets --url), then for each rate sends
the workload's requests as streaming /v1/completions with token-id prompts,
each arriving after an exponential gap (seeded), and measures per request:
TTFT (request sent -> first token), ITL (the gap between chunks divided over
the tokens they carry, as the server's own histogram counts it) and end-to-end
latency; per rate: p50/p99 of each and output tokens per second of wall time.

Tokens are counted, not text chunks: with a random-weight model most tokens
decode to no text at all, so a text-chunk clock reads whole runs of tokens as
one. The requests ask for vLLM's return_token_ids, so every step that adds
tokens sends a chunk carrying them, text or not. As a check on the client's
clock, the table also shows the p50 of the server's own TTFT, ITL and
queue-time histograms over the same rate (from /metrics, scraped before and
after).

    python -m benchmarks.serving --model qwen2.5-0.5b --rates 2,8,32 --num-requests 200 --out results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import print_table, save_json
from benchmarks.workloads import MODEL_SHAPES, Request, make_workload, model_folder, token_id_limit


@dataclass
class RequestTiming:
    ttft_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = float("nan")
    output_tokens: int = 0
    error: str | None = None


async def send(client: httpx.AsyncClient, model: str, request: Request) -> RequestTiming:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    timing = RequestTiming()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                new_tokens = sum(len(choice.get("token_ids") or []) for choice in chunk.get("choices", []))
                if new_tokens <= 0:
                    continue
                timing.output_tokens += new_tokens
                now = time.perf_counter()
                if math.isnan(timing.ttft_s):
                    timing.ttft_s = now - start
                    new_tokens -= 1
                timing.itl_s += [(now - last) / new_tokens] * new_tokens if new_tokens else []
                last = now
    except httpx.HTTPError as error:
        timing.error = repr(error)
        return timing
    timing.e2e_s = time.perf_counter() - start
    return timing


HISTOGRAMS = {"server_ttft_p50_ms": "kubellm_time_to_first_token_seconds",
              "server_itl_p50_ms": "kubellm_inter_token_latency_seconds",
              "server_queue_p50_ms": "kubellm_request_queue_time_seconds"}


def histogram_buckets(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the server's latency histograms, by metric name."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS.values()}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            metric = sample.name.removesuffix("_bucket")
            if sample.name.endswith("_bucket") and metric in buckets:
                bound = float(sample.labels["le"])
                buckets[metric][bound] = buckets[metric].get(bound, 0.0) + sample.value
    return buckets


def histogram_p50_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The median of what a histogram observed between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    target, lower, below = counts[-1] / 2, 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= target:
            if math.isinf(bound):
                return 1e3 * lower
            return 1e3 * (lower + (bound - lower) * (target - below) / max(count - below, 1e-12))
        lower, below = bound, count
    return float("nan")


async def run_rate(url: str, model: str, requests: list[Request], rate: float, seed: int) -> tuple[list[RequestTiming], float]:
    """Send every request at Poisson arrival times of `rate` per second; (timings, wall seconds)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for request in requests:
            tasks.append(asyncio.create_task(send(client, model, request)))
            await asyncio.sleep(rng.expovariate(rate))
        timings = await asyncio.gather(*tasks)
        return list(timings), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summarize(rate: float, timings: list[RequestTiming], wall_s: float) -> dict:
    done = [t for t in timings if t.error is None]
    itl = [gap for t in done for gap in t.itl_s]
    output = sum(t.output_tokens for t in done)
    return {"rate_req_s": rate, "requests": len(timings), "errors": len(timings) - len(done),
            "ttft_p50_ms": 1e3 * percentile([t.ttft_s for t in done], 50),
            "ttft_p99_ms": 1e3 * percentile([t.ttft_s for t in done], 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "e2e_p50_s": percentile([t.e2e_s for t in done], 50), "e2e_p99_s": percentile([t.e2e_s for t in done], 99),
            "output_tok_s": output / wall_s, "requests_s": len(done) / wall_s}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int, extra_args: list[str], timeout_s: float) -> subprocess.Popen:
    command = [sys.executable, "-m", "engine.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "bench", "--log-level", "warning", *extra_args]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kubellm serve exited with status {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"kubellm serve was not ready after {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--url", help="benchmark this running server instead of starting one (model name 'bench')")
    parser.add_argument("--rates", default="2,8,32",
                        help="request rates per second, comma-separated; inf sends every request at once")
    parser.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    parser.add_argument("--workload", choices=["mixed", "fixed"], default="mixed")
    parser.add_argument("--length-scale", type=float, default=1.0, help="shrink lengths (smoke tests)")
    parser.add_argument("--server-args", default="--dtype bfloat16 --max-model-len 4096",
                        help="extra `kubellm serve` arguments")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    folder = model_folder(args.model, args.model_root)
    requests = make_workload(args.workload, token_id_limit(folder), args.num_requests, scale=args.length_scale)
    server = None
    url = args.url
    if url is None:
        port = free_port()
        server = start_server(folder, port, args.server_args.split(), args.ready_timeout)
        url = f"http://127.0.0.1:{port}"
    try:
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            before = histogram_buckets(url)
            seed = int(rate * 1000) if math.isfinite(rate) else 0  # rate inf: no arrival gaps to draw
            timings, wall_s = asyncio.run(run_rate(url, "bench", requests, rate, seed=seed))
            after = histogram_buckets(url)
            rows.append(summarize(rate, timings, wall_s))
            for column, metric in HISTOGRAMS.items():
                rows[-1][column] = histogram_p50_ms(before[metric], after[metric])
            print(f"rate {rate:g}/s: {rows[-1]['output_tok_s']:,.0f} output tok/s, "
                  f"TTFT p50 {rows[-1]['ttft_p50_ms']:,.1f} ms, errors {rows[-1]['errors']}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print_table(rows, f"online serving: {args.model}, workload {args.workload}, {args.num_requests} requests per rate")
    save_json(args.out, {"model": args.model, "workload": args.workload, "command": " ".join(sys.argv),
                         "server_args": args.server_args, "rows": rows})


if __name__ == "__main__":
    main()
