"""The harness of the CPU performance gate: time a hot path with pytest-benchmark, normalise it, gate it.

`perf_gate_session.measure(benchmark, build)` runs the rounds of the hot path `build()` makes through
`benchmark.pedantic`, with one round of the calibration workload as each round's setup (untimed by
pytest-benchmark, timed here), so the two are interleaved and see the same machine state. The ratio of their
medians is compared with perf/baselines/cpu_hot_paths.json. A ratio over the threshold is measured again, up to
CONFIRM_ATTEMPTS more times, on a freshly built hot path (same rounds, same interleaving, timed here:
pytest-benchmark's fixture runs once per test). The test fails only when every attempt is over, so a burst of load
from a neighbour does not fail CI but a real slowdown, which is there every time, does.

While timing, torch runs single-threaded (on a small shared CI machine a second intra-op thread mostly measures the
neighbours) and the garbage collector is off (what a full collection costs depends on what the rest of the suite
left on the heap, not on the hot path). Environment switches (GRAPHSERVE_PERF_GATE=0, GRAPHSERVE_PERF_RECORD,
GRAPHSERVE_BENCH_INJECT_SLOWDOWN) are documented in perf_gate.py; perf/update_baseline.py refreshes the baseline.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import bench_workloads
import perf_gate
import pytest
import torch

CONFIRM_ATTEMPTS = 2


@contextmanager
def _timing_conditions():
    """One torch thread and no garbage collection for the block (collect once first); both restored after."""
    threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if gc_was_enabled:
            gc.enable()


class _Calibration:
    """The calibration round used as a setup callable: runs one round and keeps its CPU time."""

    def __init__(self) -> None:
        self.samples_s: list[float] = []

    def __call__(self) -> None:
        start = perf_gate.TIMER()
        bench_workloads.calibration_round()
        self.samples_s.append(perf_gate.TIMER() - start)


class PerfGateSession:
    """Settings read once per session, plus every hot path's figures (for GRAPHSERVE_PERF_RECORD)."""

    def __init__(self, environ) -> None:
        self.enabled = perf_gate.gate_enabled(environ)
        self.record_path = environ.get(perf_gate.ENV_RECORD) or None
        self.slowdowns = perf_gate.parse_slowdowns(environ.get(perf_gate.ENV_INJECT), bench_workloads.HOT_PATHS)
        self.baseline = perf_gate.load_baseline()
        self.results: dict[str, dict] = {}

    def measure(self, benchmark, build: Callable[[], bench_workloads.HotPath]) -> None:
        """Time the hot path `build()` makes, interleaved with the calibration, then gate its ratio (fails or skips
        the test). A confirmation attempt builds it afresh: a hot path's state only lasts for its own rounds."""
        hot_path = build()
        run = self._slowed(hot_path)
        calibration = _Calibration()
        with _timing_conditions():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            benchmark.pedantic(run, setup=calibration, rounds=hot_path.rounds, warmup_rounds=hot_path.warmup_rounds)
            cpu_share = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
        if benchmark.disabled or benchmark.stats is None:  # --benchmark-disable: ran once, nothing to judge
            return
        # pytest-benchmark's median of the timed rounds; the calibration's warm-up rounds are left out likewise.
        timed_calibration = calibration.samples_s[hot_path.warmup_rounds:]
        first = perf_gate.Measurement(benchmark.stats.stats.median, statistics.median(timed_calibration), cpu_share,
                                      perf_gate.relative_spread(timed_calibration))
        benchmark.extra_info.update(calibration_median_s=first.calibration_median_s, normalised=first.ratio,
                                    cpu_share=cpu_share, injected_slowdown=self.slowdowns.get(hot_path.name, 1.0))
        name = hot_path.name
        self.results[name] = {"ratio": first.ratio, "median_s": first.median_s,
                              "calibration_median_s": first.calibration_median_s, "cpu_share": cpu_share}
        del hot_path, run  # an engine holds memory: free it before a confirmation attempt builds another
        self._gate(name, [first], lambda: self._remeasure(build()))

    def _slowed(self, hot_path: bench_workloads.HotPath) -> Callable[[], object]:
        return perf_gate.slowed(hot_path.run, self.slowdowns.get(hot_path.name, 1.0))

    def _remeasure(self, hot_path: bench_workloads.HotPath) -> perf_gate.Measurement:
        """The same interleaved rounds as `measure`, timed here (a confirmation attempt)."""
        run = self._slowed(hot_path)
        calibration = _Calibration()
        samples_s = []
        with _timing_conditions():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for _ in range(hot_path.warmup_rounds + hot_path.rounds):
                calibration()
                start = perf_gate.TIMER()
                run()
                samples_s.append(perf_gate.TIMER() - start)
            cpu_share = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
        skip = hot_path.warmup_rounds
        return perf_gate.Measurement.from_samples(samples_s[skip:], calibration.samples_s[skip:], cpu_share)

    def _gate(self, name: str, attempts: list[perf_gate.Measurement], remeasure) -> None:
        if not self.enabled:
            return
        if self.baseline is None:
            pytest.fail(f"no baseline at {perf_gate.BASELINE_PATH}: record one with `{perf_gate.REFRESH_COMMAND}`",
                        pytrace=False)
        recorded_on = self.baseline.get("recorded_on", {})
        mismatch = perf_gate.baseline_mismatch(recorded_on, perf_gate.machine_info())
        if mismatch:
            pytest.skip(f"perf gate not applied to {name!r}: {mismatch}")
        try:
            verdict = perf_gate.compare(name, attempts[0].ratio, self.baseline)
        except KeyError as e:
            pytest.fail(str(e.args[0]), pytrace=False)
        while not verdict.passed and len(attempts) <= CONFIRM_ATTEMPTS:
            attempts.append(remeasure())
            verdict = perf_gate.compare(name, min(m.ratio for m in attempts), self.baseline)
        if verdict.passed:
            return
        outcome, verdict, reasons = perf_gate.judge(name, attempts, self.baseline, os.getloadavg()[0],
                                                    os.cpu_count() or 1)
        message = perf_gate.failure_message(verdict, attempts, recorded_on)
        if outcome == "fail":
            pytest.fail(message, pytrace=False)
        if outcome == "inconclusive":
            pytest.skip(f"perf gate inconclusive for {name!r}: {verdict.slowdown:.2f}x its baseline, but every "
                        f"measurement was taken on a disturbed machine ({'; '.join(reasons)}), where an unchanged "
                        f"tree also reads up to ~1.6x; slowdowns from {perf_gate.GROSS_SLOWDOWN:.1f}x still fail.\n"
                        + message)

    def write_record(self) -> None:
        """Write this run's figures to GRAPHSERVE_PERF_RECORD (when set)."""
        if self.record_path:
            perf_gate.write_json(self.record_path, {"machine": perf_gate.machine_info(), "results": self.results})


@pytest.fixture(scope="session")
def perf_gate_session():
    """The session's PerfGateSession; writes the GRAPHSERVE_PERF_RECORD file at the end."""
    session = PerfGateSession(os.environ)
    yield session
    session.write_record()
