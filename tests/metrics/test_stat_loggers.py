"""Per-sequence timestamps to iteration stats, the Prometheus collectors, and the periodic log line."""
import logging
import time

import pytest

from graphserve.core.scheduler_output import EngineCoreOutput
from graphserve.metrics.loggers import LoggingStatLogger
from graphserve.metrics.prometheus import PrometheusStatLogger, build_1_2_5_buckets
from graphserve.metrics.stats import IterationStats, RequestStatsTracker, SchedulerStats


def _out(req_id, num_tokens, finish_reason=None, scheduled=None):
    return EngineCoreOutput(req_id, list(range(num_tokens)), finish_reason=finish_reason,
                            first_scheduled_time=scheduled)


def test_tracker_times_first_token_gaps_and_finish():
    tracker = RequestStatsTracker()
    tracker.add_sequence("a", arrival_time=10.0, num_prompt_tokens=7)
    tracker.add_sequence("b", arrival_time=10.5, num_prompt_tokens=3)
    step1 = tracker.update([_out("a", 0, scheduled=10.2), _out("b", 1, scheduled=10.6)], [], now=11.0)
    assert step1.num_prompt_tokens == 3 and step1.num_generation_tokens == 1
    assert step1.time_to_first_tokens == [pytest.approx(0.5)] and step1.inter_token_latencies == []
    step2 = tracker.update([_out("a", 1), _out("b", 2)], [], now=11.5)
    assert step2.num_prompt_tokens == 7 and step2.num_generation_tokens == 3
    assert step2.time_to_first_tokens == [pytest.approx(1.5)]
    assert step2.inter_token_latencies == [pytest.approx(0.5)]
    step3 = tracker.update([_out("a", 1, "length"), _out("b", 1)], ["b"], now=12.0)  # b: a stop string
    finished = {f.finish_reason: f for f in step3.finished_requests}
    assert finished["length"].e2e_latency == pytest.approx(2.0) and finished["length"].num_generation_tokens == 2
    assert finished["length"].queue_time == pytest.approx(0.2) and finished["length"].num_prompt_tokens == 7
    assert finished["stop"].num_generation_tokens == 4 and finished["stop"].queue_time == pytest.approx(0.1)
    assert tracker.num_tracked == 0
    assert tracker.update([_out("a", 1)], [], now=13.0).num_generation_tokens == 0  # finished: ignored


def test_tracker_finish_from_outside():
    tracker = RequestStatsTracker()
    tracker.add_sequence("x", arrival_time=1.0, num_prompt_tokens=4)
    stats = tracker.finish(["x", "unknown"], "abort", now=3.0)
    assert [(f.finish_reason, f.e2e_latency, f.queue_time) for f in stats.finished_requests] == [("abort", 2.0, None)]


def _sample(logger, name, **labels):
    return logger.registry.get_sample_value(name, {"model_name": "m", **labels})


def test_prometheus_names_and_values():
    logger = PrometheusStatLogger("m", max_model_len=4096)
    tracker = RequestStatsTracker()
    tracker.add_sequence("a", arrival_time=0.0, num_prompt_tokens=5)
    logger.record(SchedulerStats(2, 1, 0.25, num_preemptions=3, prefix_cache_queries=10, prefix_cache_hits=4),
                  tracker.update([_out("a", 1, scheduled=0.1)], [], now=0.2))
    logger.record(SchedulerStats(0, 0, 0.0, num_preemptions=5, prefix_cache_queries=10, prefix_cache_hits=4),
                  tracker.update([_out("a", 2, "stop")], [], now=0.3))
    assert _sample(logger, "graphserve:num_requests_running") == 0
    assert _sample(logger, "graphserve:kv_cache_usage_perc") == 0
    assert _sample(logger, "graphserve:num_preemptions_total") == 5  # a running total becomes a counter
    assert _sample(logger, "graphserve:prefix_cache_hits_total") == 4
    assert _sample(logger, "graphserve:prompt_tokens_total") == 5
    assert _sample(logger, "graphserve:generation_tokens_total") == 3
    assert _sample(logger, "graphserve:request_success_total", finished_reason="stop") == 1
    assert _sample(logger, "graphserve:time_to_first_token_seconds_sum") == pytest.approx(0.2)
    assert _sample(logger, "graphserve:inter_token_latency_seconds_count") == 1
    assert _sample(logger, "graphserve:request_queue_time_seconds_sum") == pytest.approx(0.1)
    assert _sample(logger, "graphserve:request_generation_tokens_sum") == 3
    assert _sample(logger, "graphserve:e2e_request_latency_seconds_count") == 1
    text = logger.exposition().decode()
    assert 'graphserve:num_requests_waiting{model_name="m"}' in text


def test_length_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]


def test_periodic_log_line(caplog):
    logger = LoggingStatLogger()
    logger.record(SchedulerStats(3, 2, 0.5, 1), IterationStats(0.0, num_prompt_tokens=100, num_generation_tokens=40))
    with caplog.at_level(logging.INFO, logger="graphserve.metrics"):
        logger.log()
        logger.log()  # nothing happened since: no second line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "Avg prompt throughput" in lines[0] and "Running: 3 reqs, Waiting: 2 reqs" in lines[0]
    assert "KV cache usage: 50.0%" in lines[0] and "Preemptions: 1" in lines[0]


def test_periodic_log_line_prefix_cache_hit_rate_per_interval():
    logger = LoggingStatLogger()
    logger.record(SchedulerStats(1, 0, 0.1, 0, prefix_cache_queries=400, prefix_cache_hits=100), None)
    assert "Prefix cache hit rate: 25.0%" in logger.format_line(time.monotonic())
    logger.log()
    # The next interval counts only its own queries: 200 more, all hits.
    logger.record(SchedulerStats(1, 0, 0.1, 0, prefix_cache_queries=600, prefix_cache_hits=300), None)
    assert "Prefix cache hit rate: 100.0%" in logger.format_line(time.monotonic())
