"""What the stat loggers consume: scheduler snapshots, per-step iteration stats and per-sequence timestamps.

Pure Python (no torch, no prometheus_client), with vLLM V1's meanings: every engine request (each of the best_of
children of a user request) is one sequence; all times are `time.monotonic()` seconds, the clock of
`Request.arrival_time`.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field

from graphserve.core.scheduler_output import EngineCoreOutput


@dataclass
class SchedulerStats:
    """The scheduler after a step: sent by the engine core with every batch of outputs."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, [0, 1]
    num_preemptions: int = 0  # cumulative since start
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
    # Speculative decoding, cumulative: verify steps (one per request per step with drafts), drafts verified,
    # drafts accepted. Acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


@dataclass
class FinishedRequestStats:
    """One sequence that ended (any reason, also abort)."""

    finish_reason: str
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_time: float | None = None  # None when it never got scheduled (or the core did not say when)


@dataclass
class IterationStats:
    """What one engine step (or one batch of aborts) changed, measured in the frontend."""

    timestamp: float
    num_prompt_tokens: int = 0  # prompts of sequences that got their first token now
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class _SequenceStats:
    """Timestamps of one sequence while it runs."""

    __slots__ = ("arrival_time", "num_prompt_tokens", "first_scheduled_time", "first_token_time",
                 "last_token_time", "num_generation_tokens")

    def __init__(self, arrival_time: float, num_prompt_tokens: int) -> None:
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time = arrival_time
        self.num_generation_tokens = 0

    def finished(self, reason: str, now: float) -> FinishedRequestStats:
        queue_time = None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time
        return FinishedRequestStats(
            reason, now - self.arrival_time, self.num_prompt_tokens, self.num_generation_tokens, queue_time
        )


class RequestStatsTracker:
    """Turns each step's EngineCoreOutputs into IterationStats, keeping per-sequence timestamps in between."""

    def __init__(self) -> None:
        self._seqs: dict[str, _SequenceStats] = {}

    def add_sequence(self, seq_id: str, arrival_time: float, num_prompt_tokens: int) -> None:
        """Start tracking an engine request (one child of a user request)."""
        self._seqs[seq_id] = _SequenceStats(arrival_time, num_prompt_tokens)

    @property
    def num_tracked(self) -> int:
        """Sequences not finished yet."""
        return len(self._seqs)

    def update(self, outputs: Iterable[EngineCoreOutput], stopped_ids: Iterable[str], now: float) -> IterationStats:
        """Book one step's outputs; `stopped_ids` are sequences a stop string ended (finish reason "stop")."""
        stats = IterationStats(now)
        seqs = self._seqs
        for output in outputs:
            seq = seqs.get(output.req_id)
            if seq is None:
                continue  # already finished (stop string, abort)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = output.first_scheduled_time
            num_new = len(output.new_token_ids)
            if num_new:
                stats.num_generation_tokens += num_new
                if seq.first_token_time is None:
                    seq.first_token_time = now
                    stats.num_prompt_tokens += seq.num_prompt_tokens
                    stats.time_to_first_tokens.append(now - seq.arrival_time)
                else:
                    stats.inter_token_latencies.append(now - seq.last_token_time)
                seq.last_token_time = now
                seq.num_generation_tokens += num_new
            if output.finish_reason is not None:
                stats.finished_requests.append(seqs.pop(output.req_id).finished(output.finish_reason, now))
        for seq_id in stopped_ids:
            seq = seqs.pop(seq_id, None)
            if seq is not None:
                stats.finished_requests.append(seq.finished("stop", now))
        return stats

    def finish(self, seq_ids: Iterable[str], reason: str, now: float) -> IterationStats:
        """End sequences from outside the engine step (client abort, engine failure)."""
        stats = IterationStats(now)
        for seq_id in seq_ids:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None:
                stats.finished_requests.append(seq.finished(reason, now))
        return stats


class StatLoggerBase(abc.ABC):
    """A consumer of engine stats (Prometheus, the periodic log line, ...)."""

    @abc.abstractmethod
    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Book one batch of stats; called on the event loop after every engine step."""

    def log(self) -> None:  # noqa: B027 (optional hook)
        """Called periodically; loggers that report on a schedule do it here."""
