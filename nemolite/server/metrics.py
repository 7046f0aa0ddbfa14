"""Prometheus metrics of one server: request and token counters, latency histograms, engine gauges."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # the *_created series only add noise to every scrape

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0)


class Metrics:
    """One registry per server, so that several apps (tests) never share counters."""

    def __init__(self, engine_stats: Callable[[], dict[str, float]], model_name: str):
        self.registry = CollectorRegistry()
        self.requests = Counter("nemolite_requests", "Requests answered, by protocol and HTTP status",
                                ["protocol", "status"], registry=self.registry)
        self.prompt_tokens = Counter("nemolite_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=self.registry)
        self.generation_tokens = Counter("nemolite_generation_tokens", "Tokens generated for finished or aborted "
                                         "generations", registry=self.registry)
        self.time_to_first_token = Histogram("nemolite_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram("nemolite_time_per_output_token_seconds",
                                               "Mean time between tokens after the first, per generation",
                                               buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram("nemolite_e2e_request_latency_seconds", "Arrival to last token",
                                     buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.lora_requests = Counter("nemolite_lora_requests", "Engine requests run with each LoRA adapter",
                                     ["adapter"], registry=self.registry)
        self.lora_generation_tokens = Counter("nemolite_lora_generation_tokens", "Tokens generated with each LoRA "
                                              "adapter", ["adapter"], registry=self.registry)
        self.registry.register(_EngineCollector(engine_stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine gauges read at scrape time, so they are never stale."""

    _GAUGES = {
        "num_running": ("nemolite_num_requests_running", "Sequences in the running batch"),
        "num_waiting": ("nemolite_num_requests_waiting", "Sequences waiting for the running batch"),
        "kv_blocks_total": ("nemolite_kv_cache_blocks_total", "KV-cache blocks"),
        "kv_blocks_free": ("nemolite_kv_cache_blocks_free", "KV-cache blocks not held by any sequence"),
        "prefix_cache_hit_rate": ("nemolite_prefix_cache_hit_rate", "Prompt blocks found in the prefix cache"),
        "num_preemptions": ("nemolite_num_preemptions", "Sequences preempted for lack of KV blocks so far"),
    }

    def __init__(self, engine_stats: Callable[[], dict[str, float]], model_name: str):
        self.engine_stats = engine_stats
        self.model_name = model_name

    def collect(self):
        stats = self.engine_stats()
        for key, (name, documentation) in self._GAUGES.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric([self.model_name], float(stats[key]))
            yield gauge
        used = GaugeMetricFamily("nemolite_kv_cache_blocks_used", "KV-cache blocks held by sequences",
                                 labels=["model_name"])
        used.add_metric([self.model_name], float(stats["kv_blocks_total"] - stats["kv_blocks_free"]))
        yield used
        for key, name, documentation in (
                ("prompt_tokens", "nemolite_engine_prompt_tokens", "Prompt tokens prefilled, counted every engine step"),
                ("generation_tokens", "nemolite_engine_generation_tokens",
                 "Tokens generated, counted every engine step (a rate that moves while requests run; "
                 "nemolite_generation_tokens counts a request's tokens when it ends)"),
                ("lora_loads", "nemolite_lora_loads", "LoRA adapters written into a slot"),
                ("lora_evictions", "nemolite_lora_evictions", "LoRA adapters that lost their slot to another")):
            if key in stats:
                counter = CounterMetricFamily(name, documentation, labels=["model_name"])
                counter.add_metric([self.model_name], float(stats[key]))
                yield counter
