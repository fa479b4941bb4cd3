"""Prometheus metrics (prefix kubellm_, label model_name).

The names are an interface: dashboards and the autoscaler (which reads
kubellm_num_requests_waiting) depend on them. Engine-wide numbers are read from
the step loop's latest EngineStats at scrape time; per-request numbers are
observed by the server as requests finish. Each app owns its registry, so tests
can build several apps in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.async_engine import AsyncLLMEngine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)

# (metric name without _total, EngineStats field, help text)
_ENGINE_COUNTERS = (
    ("kubellm_prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("kubellm_prefix_cache_hits", "prefix_cache_hits", "Prompt tokens served from the prefix cache."),
    ("kubellm_num_preemptions", "num_preemptions", "Sequences preempted because the KV cache was full."),
    ("kubellm_prompt_tokens", "prompt_tokens_total", "Prompt tokens processed (prefill)."),
    ("kubellm_generation_tokens", "generation_tokens_total", "Tokens generated."),
)


# vLLM's names for three gauges, served beside kubellm's own: the Gateway API Inference Extension's
# endpoint picker scrapes exactly these by default (its --total-queued-requests-metric,
# --total-running-requests-metric and --kv-cache-usage-percentage-metric flags), so it routes to
# kubellm engines with no extra configuration. Same values and labels as the kubellm_ gauge.
VLLM_ALIASES = {
    "kubellm_num_requests_waiting": "vllm:num_requests_waiting",
    "kubellm_num_requests_running": "vllm:num_requests_running",
    "kubellm_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",
}


def _alias(metric: Metric, name: str) -> Metric:
    alias = GaugeMetricFamily(name, f"{metric.documentation} (vLLM's name for {metric.name}.)",
                              labels=["model_name"])
    for sample in metric.samples:
        alias.add_metric([sample.labels["model_name"]], sample.value)
    return alias


class _EngineStatsCollector(Collector):
    """Gauges and counters read from the engine's latest stats when Prometheus scrapes."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for metric in self._kubellm_metrics():
            yield metric
            if metric.name in VLLM_ALIASES:
                yield _alias(metric, VLLM_ALIASES[metric.name])

    def _kubellm_metrics(self) -> Iterator[Metric]:
        stats = self.engine.stats

        def stat(field: str) -> float:
            return float(getattr(stats, field, 0) or 0) if stats is not None else 0.0

        def family(kind: type, name: str, documentation: str, value: float) -> Metric:
            metric = kind(name, documentation, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            return metric

        yield family(
            GaugeMetricFamily,
            "kubellm_num_requests_waiting",
            "Requests waiting to be scheduled, including those queued in the HTTP front end.",
            float(self.engine.num_waiting),
        )
        yield family(GaugeMetricFamily, "kubellm_num_requests_running", "Requests in the running batch.",
                     stat("num_running"))
        yield family(GaugeMetricFamily, "kubellm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).",
                     stat("kv_cache_usage"))
        for name, field, documentation in _ENGINE_COUNTERS:
            yield family(CounterMetricFamily, name, documentation, stat(field))


class ServerMetrics:
    """The app's registry plus the per-request metrics the server observes."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine, model_name))
        self.request_success = Counter(
            "kubellm_request_success",
            "Finished requests by finish reason.",
            ["model_name", "finish_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = self._histogram(
            "kubellm_time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self.inter_token_latency = self._histogram(
            "kubellm_inter_token_latency_seconds", "Time between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e_request_latency = self._histogram(
            "kubellm_e2e_request_latency_seconds", "Arrival to last token.", REQUEST_BUCKETS)
        self.request_queue_time = self._histogram(
            "kubellm_request_queue_time_seconds", "Arrival to first scheduled by the engine.", REQUEST_BUCKETS)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]):
        histogram = Histogram(name, documentation, ["model_name"], buckets=buckets, registry=self.registry)
        return histogram.labels(model_name=self.model_name)

    def observe_finished(self, finish_reason: str) -> None:
        self.request_success.labels(model_name=self.model_name, finish_reason=finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
