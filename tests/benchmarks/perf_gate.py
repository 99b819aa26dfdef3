"""The CPU performance gate: normalise, compare with the committed baseline, explain a failure.

Each hot path is timed by pytest-benchmark (in process CPU time, see TIMER) with a round of a fixed calibration
workload run before each of its rounds (see conftest.py), so both see the same machine state. Its figure is the
ratio of medians `median(hot path round) / median(calibration round)`: a slower or busier machine moves both, a
slower hot path moves only the first. The gate fails when `measured ratio / baseline ratio` exceeds the
baseline's threshold (and keeps exceeding it when measured again), which perf/update_baseline.py derives from the
run-to-run spread it measured (perf/baselines/cpu_hot_paths_spread.json). Refresh the baseline after an intended
change with `.venv/bin/python -m perf.update_baseline`.

Environment variables (read by the harness in conftest.py; none is set in CI, so CI gates):
  GRAPHSERVE_PERF_GATE=0                 run the benchmarks but compare nothing (e.g. when running a subset on a
                                         loaded laptop); any other value, or unset, gates
  GRAPHSERVE_PERF_RECORD=PATH            write this run's medians and ratios as JSON (perf/update_baseline.py)
  GRAPHSERVE_BENCH_INJECT_SLOWDOWN=NAME:FACTOR[,NAME:FACTOR]
                                         a test hook: make hot path NAME take FACTOR times as long (the harness
                                         spins after each round for (FACTOR - 1) times the round's own CPU time),
                                         to check that the gate catches it, e.g. scheduler:1.5
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from graphserve.platforms.cpu import CpuPlatform

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE_PATH = REPO_ROOT / "perf" / "baselines" / "cpu_hot_paths.json"
SPREAD_PATH = REPO_ROOT / "perf" / "baselines" / "cpu_hot_paths_spread.json"
REFRESH_COMMAND = ".venv/bin/python -m perf.update_baseline"

# Every round is timed in CPU time of the process, not wall time: a round that a busy neighbour pushes off the CPU
# does not count the time it waited (torch runs single-threaded while timing, so this is the hot path's own time).
TIMER = time.process_time

ENV_GATE = "GRAPHSERVE_PERF_GATE"
ENV_RECORD = "GRAPHSERVE_PERF_RECORD"
ENV_INJECT = "GRAPHSERVE_BENCH_INJECT_SLOWDOWN"


def normalise(median_s: float, calibration_median_s: float) -> float:
    """A hot path's figure: its median round time in units of the calibration's median round time."""
    if median_s <= 0 or calibration_median_s <= 0:
        raise ValueError(f"medians must be positive, got {median_s} and {calibration_median_s}")
    return median_s / calibration_median_s


def relative_spread(samples_s: Iterable[float]) -> float:
    """(90th - 10th percentile) / median of some round times: how much a steady workload's rounds varied."""
    samples = sorted(samples_s)
    if len(samples) < 3:
        return 0.0
    deciles = statistics.quantiles(samples, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(samples)


@dataclass(frozen=True)
class Measurement:
    """One timing of a hot path: medians of its rounds and of the interleaved calibration rounds."""

    median_s: float
    calibration_median_s: float
    cpu_share: float  # CPU time / wall time while measuring: well below 1 means the machine was oversubscribed
    calibration_spread: float = 0.0  # relative_spread of the calibration rounds

    @property
    def ratio(self) -> float:
        return normalise(self.median_s, self.calibration_median_s)

    @classmethod
    def from_samples(cls, samples_s: Iterable[float], calibration_samples_s: Iterable[float],
                     cpu_share: float) -> Measurement:
        """From the per-round times of the hot path and of the calibration."""
        calibration = list(calibration_samples_s)
        return cls(statistics.median(samples_s), statistics.median(calibration), cpu_share,
                   relative_spread(calibration))


# When is a measurement trustworthy? The ratio cancels a machine that is uniformly slower, but a machine that is
# shared or throttled (a neighbour streaming memory, a slower host) slows the hot paths unevenly: on such a day an
# unchanged tree measured up to 1.6x its baseline while the calibration itself ran 1.4-1.8x slower than when the
# baseline was recorded. So a slowdown is only judged strictly on a measurement taken in conditions like the
# baseline's; otherwise it is reported as inconclusive, unless it is beyond anything noise produced (GROSS_SLOWDOWN).
CALIBRATION_DRIFT_LIMITS = (0.8, 1.25)  # calibration median / the baseline's calibration median
MAX_CALIBRATION_SPREAD = 0.30  # relative_spread of the calibration rounds within one measurement
MIN_CPU_SHARE = 0.8
GROSS_SLOWDOWN = 2.0


def baseline_calibration_s(name: str, baseline: Mapping) -> float | None:
    """The calibration's median round when the baseline was recorded (its hot path's median round / ratio)."""
    median_round_ms = baseline.get("median_round_ms", {}).get(name)
    ratio = baseline.get("ratios", {}).get(name)
    return median_round_ms / 1e3 / ratio if median_round_ms and ratio else None


def unreliable_reasons(m: Measurement, baseline_calibration: float | None, load_average: float,
                       num_cpus: int) -> list[str]:
    """Why measurement `m` cannot be trusted to judge a slowdown (empty: it can)."""
    reasons = []
    if baseline_calibration:
        drift = m.calibration_median_s / baseline_calibration
        low, high = CALIBRATION_DRIFT_LIMITS
        if not low <= drift <= high:
            reasons.append(f"the calibration ran at {drift:.2f}x its time when the baseline was recorded")
    if m.calibration_spread > MAX_CALIBRATION_SPREAD:
        reasons.append(f"the calibration rounds varied by {m.calibration_spread:.0%}")
    if m.cpu_share < MIN_CPU_SHARE:
        reasons.append(f"the process got {m.cpu_share:.0%} of a CPU")
    if load_average > num_cpus:
        reasons.append(f"the load average {load_average:.1f} exceeds the {num_cpus} CPUs")
    return reasons


def judge(name: str, attempts: list[Measurement], baseline: Mapping, load_average: float,
          num_cpus: int) -> tuple[str, Verdict, list[str]]:
    """("pass" | "fail" | "inconclusive", the verdict on the fastest attempt, the reasons when inconclusive).

    Attempts taken in trustworthy conditions are judged strictly by the threshold. If none was, an over-threshold
    slowdown below GROSS_SLOWDOWN is inconclusive (the machine's noise reaches that far); a gross one fails."""
    verdict = compare(name, min(m.ratio for m in attempts), baseline)
    if verdict.passed:
        return "pass", verdict, []
    reference = baseline_calibration_s(name, baseline)
    reasons = [unreliable_reasons(m, reference, load_average, num_cpus) for m in attempts]
    clean = [m for m, r in zip(attempts, reasons) if not r]
    if clean:
        verdict = compare(name, min(m.ratio for m in clean), baseline)
        return ("pass" if verdict.passed else "fail"), verdict, []
    if verdict.slowdown >= GROSS_SLOWDOWN:
        return "fail", verdict, []
    fastest = min(range(len(attempts)), key=lambda i: attempts[i].ratio)
    return "inconclusive", verdict, reasons[fastest]


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on one hot path."""

    name: str
    baseline_ratio: float
    measured_ratio: float
    threshold: float

    @property
    def slowdown(self) -> float:
        """measured / baseline: 1.5 means 50 % slower than when the baseline was recorded."""
        return self.measured_ratio / self.baseline_ratio

    @property
    def passed(self) -> bool:
        return self.slowdown <= self.threshold


def compare(name: str, measured_ratio: float, baseline: Mapping) -> Verdict:
    """Judge one measured ratio against the baseline file's contents: its "ratios" and the hot path's own entry
    in "thresholds" (each derived from that path's spread), else the global "threshold" (the loosest of them)."""
    ratios = baseline.get("ratios", {})
    if name not in ratios:
        raise KeyError(f"hot path {name!r} has no baseline ratio in {BASELINE_PATH.name}; "
                       f"record one with `{REFRESH_COMMAND}`")
    threshold = baseline.get("thresholds", {}).get(name, baseline["threshold"])
    return Verdict(name, float(ratios[name]), measured_ratio, float(threshold))


def failure_message(verdict: Verdict, attempts: list[Measurement], recorded_on: Mapping | None = None) -> str:
    """What a failing gate prints: the hot path, both ratios, the slowdown factor, every attempt, what to do."""
    lines = [
        f"CPU hot path {verdict.name!r} is {verdict.slowdown:.2f}x slower than its baseline "
        f"(threshold {verdict.threshold:.2f}x): normalised time {verdict.measured_ratio:.4f} vs baseline "
        f"{verdict.baseline_ratio:.4f}",
        f"  {len(attempts)} measurement(s), the fastest judged; each: median round / median interleaved "
        f"calibration round (CPU time) = ratio, share of a CPU the process got:",
    ]
    for m in attempts:
        lines.append(f"    {m.median_s * 1e3:.3f} ms / {m.calibration_median_s * 1e3:.3f} ms = {m.ratio:.4f} "
                     f"({m.ratio / verdict.baseline_ratio:.2f}x baseline), CPU share {m.cpu_share:.0%}")
    if recorded_on:
        lines.append("  baseline recorded on: " + ", ".join(f"{k}={v}" for k, v in recorded_on.items()))
    lines.append(f"  if the slowdown is intended (or the CI machine changed), refresh the baseline: "
                 f"`{REFRESH_COMMAND}`; GRAPHSERVE_PERF_GATE=0 skips the comparison")
    return "\n".join(lines)


def parse_slowdowns(spec: str | None, known: Iterable[str]) -> dict[str, float]:
    """Parse GRAPHSERVE_BENCH_INJECT_SLOWDOWN ("scheduler:1.5,sampler:2") into {name: factor}."""
    if not spec or not spec.strip():
        return {}
    known = set(known)
    out: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, factor_text = item.strip().partition(":")
        if not sep:
            raise ValueError(f"{ENV_INJECT}: expected NAME:FACTOR, got {item.strip()!r}")
        if name not in known:
            raise ValueError(f"{ENV_INJECT}: unknown hot path {name!r}; known: {', '.join(sorted(known))}")
        try:
            factor = float(factor_text)
        except ValueError:
            raise ValueError(f"{ENV_INJECT}: factor of {name!r} must be a number, got {factor_text!r}") from None
        if not factor >= 1.0:
            raise ValueError(f"{ENV_INJECT}: factor of {name!r} must be >= 1, got {factor}")
        out[name] = factor
    return out


def slowed(fn: Callable[[], object], factor: float,
           timer: Callable[[], float] = TIMER) -> Callable[[], object]:
    """`fn` made `factor` times as slow: after each call, busy-wait (factor - 1) times the call's own duration."""
    if factor == 1.0:
        return fn

    def run() -> object:
        start = timer()
        result = fn()
        end = timer()
        until = end + (end - start) * (factor - 1.0)
        while timer() < until:
            pass
        return result

    return run


def gate_enabled(environ: Mapping[str, str]) -> bool:
    """Gating is on unless GRAPHSERVE_PERF_GATE is "0" (or false/no/off)."""
    return environ.get(ENV_GATE, "1").strip().lower() not in ("0", "false", "no", "off")


def machine_info() -> dict:
    """What the ratios depend on: interpreter and library versions, CPU model and count."""
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu": CpuPlatform().device_name(),
        "num_cpus": os.cpu_count(),
    }


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def baseline_mismatch(recorded: Mapping, current: Mapping) -> str | None:
    """Why a baseline does not apply here, or None when it does.

    The calibration absorbs a machine that is uniformly faster or slower, or busier; it cannot absorb a change in
    the balance between interpreted Python and torch kernels, which another CPU model (other vector units, caches)
    or another Python / torch minor version brings. On those the gate skips itself, saying so, rather than fail.
    """
    for key in ("python", "torch"):
        if key in recorded and _major_minor(str(recorded[key])) != _major_minor(str(current[key])):
            return (f"baseline recorded with {key} {recorded[key]}, running {current[key]}: refresh it with "
                    f"`{REFRESH_COMMAND}`")
    if "cpu" in recorded and recorded["cpu"] != current["cpu"]:
        return (f"baseline recorded on CPU {recorded['cpu']!r}, running on {current['cpu']!r}: record one on this "
                f"machine with `{REFRESH_COMMAND}`")
    return None


def load_baseline(path: Path = BASELINE_PATH) -> dict | None:
    """The committed baseline, or None when there is none yet."""
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: Path | str, data: Mapping) -> None:
    """Write `data` as indented JSON with a trailing newline."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")


def spread_summary(runs: list[Mapping[str, float]], baseline_ratios: Mapping[str, float]) -> dict:
    """Per hot path, how far each run's ratio strayed from the baseline: min / max of measured / baseline.

    `runs` holds one {name: ratio} per unchanged run; a factor above 1 is a run that looked slower than the
    baseline (what could fail the gate falsely), below 1 one that looked faster (what could hide a regression).
    """
    summary = {}
    for name, base in baseline_ratios.items():
        factors = [run[name] / base for run in runs if name in run]
        if factors:
            summary[name] = {"min_factor": round(min(factors), 4), "max_factor": round(max(factors), 4),
                             "num_runs": len(factors)}
    return summary


def derive_threshold(worst_slowdown: float, fastest_factor: float, margin: float = 0.10, floor: float = 1.25,
                     step: float = 0.01, injected: float = 1.5) -> float:
    """The gate's threshold from the measured spread: `margin` above the worst slowdown any unchanged run showed,
    rounded up to `step`, at least `floor` (a quiet path's figure still wanders by ~1.1x now and then: one of 23
    unchanged runs failed at a floor of 1.20).

    Raises ValueError when that threshold could not catch an `injected` slowdown even in the fastest-looking run
    (injected * fastest_factor must exceed it): the benchmarks are then too noisy to gate on and need more rounds.
    """
    steps = -(-round((worst_slowdown + margin) * 1e6) // round(step * 1e6))  # ceil without float drift
    threshold = max(floor, steps * step)
    threshold = round(threshold, 4)
    if injected * fastest_factor <= threshold:
        raise ValueError(f"threshold {threshold:.2f} (worst unchanged slowdown {worst_slowdown:.3f}) would not "
                         f"catch a {injected}x slowdown in a run that measured {fastest_factor:.3f}x of baseline")
    return threshold
