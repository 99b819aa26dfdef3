"""The periodic log line: prompt and generation throughput, running / waiting requests, KV cache usage, the
prefix-cache hit rate of the interval and, with speculative decoding, its draft acceptance rate and mean accepted
length."""
from __future__ import annotations

import logging
import time

from graphserve.metrics.stats import IterationStats, SchedulerStats, StatLoggerBase

logger = logging.getLogger("graphserve.metrics")


class LoggingStatLogger(StatLoggerBase):
    """Accumulates tokens between calls to log(), which writes one INFO line when anything happened."""

    def __init__(self) -> None:
        self._last_log_time = time.monotonic()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_finished = 0
        self._scheduler_stats = SchedulerStats()
        self._last_logged_state: tuple | None = None
        # Cumulative prefix-cache counters at the start of the interval (the hit rate is per interval, like vLLM's).
        self._interval_start_queries = 0
        self._interval_start_hits = 0
        self._interval_start_spec = (0, 0, 0)  # drafts, draft tokens, accepted tokens

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Book one batch of stats."""
        if scheduler_stats is not None:
            self._scheduler_stats = scheduler_stats
        if iteration_stats is not None:
            self._num_prompt_tokens += iteration_stats.num_prompt_tokens
            self._num_generation_tokens += iteration_stats.num_generation_tokens
            self._num_finished += len(iteration_stats.finished_requests)

    def format_line(self, now: float) -> str:
        """The line for the interval ending at `now` (does not reset anything)."""
        elapsed = max(now - self._last_log_time, 1e-9)
        s = self._scheduler_stats
        return (
            f"Avg prompt throughput: {self._num_prompt_tokens / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {self._num_generation_tokens / elapsed:.1f} tokens/s, "
            f"Running: {s.num_running_reqs} reqs, Waiting: {s.num_waiting_reqs} reqs, "
            f"Finished: {self._num_finished} reqs, KV cache usage: {100 * s.kv_cache_usage:.1f}%, "
            f"Preemptions: {s.num_preemptions}, Prefix cache hit rate: {100 * self._interval_hit_rate():.1f}%"
            f"{self._spec_decode_part()}"
        )

    def _spec_decode_part(self) -> str:
        """', Draft acceptance rate: ..., Mean accepted length: ...' for the interval, '' without verify steps."""
        s = self._scheduler_stats
        drafts0, tokens0, accepted0 = self._interval_start_spec
        drafts = s.spec_decode_num_drafts - drafts0
        if drafts <= 0:
            return ""
        tokens = s.spec_decode_num_draft_tokens - tokens0
        accepted = s.spec_decode_num_accepted_tokens - accepted0
        rate = accepted / tokens if tokens else 0.0
        return f", Draft acceptance rate: {100 * rate:.1f}%, Mean accepted length: {1 + accepted / drafts:.2f}"

    def _interval_hit_rate(self) -> float:
        s = self._scheduler_stats
        queries = s.prefix_cache_queries - self._interval_start_queries
        return (s.prefix_cache_hits - self._interval_start_hits) / queries if queries > 0 else 0.0

    def log(self) -> None:
        """Write the line, unless the engine stayed idle since the last one; then start a new interval."""
        now = time.monotonic()
        s = self._scheduler_stats
        state = (s.num_running_reqs, s.num_waiting_reqs, s.kv_cache_usage, s.num_preemptions)
        active = self._num_prompt_tokens or self._num_generation_tokens or self._num_finished
        if active or state != self._last_logged_state:
            logger.info(self.format_line(now))
            self._last_logged_state = state
        self._last_log_time = now
        self._num_prompt_tokens = self._num_generation_tokens = self._num_finished = 0
        self._interval_start_queries = s.prefix_cache_queries
        self._interval_start_hits = s.prefix_cache_hits
        self._interval_start_spec = (s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens,
                                     s.spec_decode_num_accepted_tokens)
