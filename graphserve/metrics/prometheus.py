"""Prometheus collectors with vLLM V1's names and meanings, under the `graphserve:` prefix.

Each server owns its CollectorRegistry (several servers can live in one process, e.g. in tests); every metric
carries the `model_name` label, as vLLM's do.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from graphserve.metrics.stats import IterationStats, SchedulerStats, StatLoggerBase

PREFIX = "graphserve:"
FINISH_REASONS = ("stop", "length", "abort")

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: token-count buckets that scale with the context length."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class PrometheusStatLogger(StatLoggerBase):
    """Feeds the gauges, counters and histograms of one served model."""

    def __init__(self, model_name: str, max_model_len: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"model_name": model_name}
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, list(labels), registry=reg).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, list(labels), registry=reg).labels(**labels)

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=reg).labels(**labels)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = 100%).")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens produced.")
        self.num_preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts",
                                              "Speculative verify steps (one per request per step with drafts).")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                          list(labels) + ["finished_reason"], registry=reg)
        self.request_success = {r: success.labels(**labels, finished_reason=r) for r in FINISH_REASONS}
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between tokens.", _ITL_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time waiting before first scheduled.",
                                    _LATENCY_BUCKETS)
        length_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", length_buckets)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                                   length_buckets)
        self._last_scheduler_stats = SchedulerStats()

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Book one batch of stats."""
        if scheduler_stats is not None:
            self._record_scheduler(scheduler_stats)
        if iteration_stats is None:
            return
        if iteration_stats.num_prompt_tokens:
            self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        if iteration_stats.num_generation_tokens:
            self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.time_to_first_token.observe(ttft)
        for itl in iteration_stats.inter_token_latencies:
            self.inter_token_latency.observe(itl)
        for finished in iteration_stats.finished_requests:
            self.request_success[finished.finish_reason].inc()
            self.e2e_latency.observe(finished.e2e_latency)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_generation_tokens)
            if finished.queue_time is not None:
                self.queue_time.observe(finished.queue_time)

    def _record_scheduler(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        # The core reports running totals; counters take the increase since the previous snapshot.
        last = self._last_scheduler_stats
        for counter, now, before in (
            (self.num_preemptions, stats.num_preemptions, last.num_preemptions),
            (self.prefix_cache_queries, stats.prefix_cache_queries, last.prefix_cache_queries),
            (self.prefix_cache_hits, stats.prefix_cache_hits, last.prefix_cache_hits),
            (self.spec_decode_num_drafts, stats.spec_decode_num_drafts, last.spec_decode_num_drafts),
            (self.spec_decode_num_draft_tokens, stats.spec_decode_num_draft_tokens,
             last.spec_decode_num_draft_tokens),
            (self.spec_decode_num_accepted_tokens, stats.spec_decode_num_accepted_tokens,
             last.spec_decode_num_accepted_tokens),
        ):
            if now > before:
                counter.inc(now - before)
        self._last_scheduler_stats = stats

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what GET /metrics returns)."""
        return generate_latest(self.registry)
