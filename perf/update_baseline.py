"""Refresh the CPU performance gate's baseline and re-measure the noise its threshold is derived from.

The gate (tests/benchmarks/, run by every `pytest` and so by CI) compares each hot path's normalised time with
perf/baselines/cpu_hot_paths.json. Run this after an intended performance change, or when CI moves to another CPU
model or Python / torch minor version (the gate skips itself there, saying so):

    .venv/bin/python -m perf.update_baseline         # 10 quiet + 6 loaded + 4 stress runs, ~3.5 min on 2 cores
    .venv/bin/python -m perf.update_baseline --runs 3 --loaded-runs 0 --stress-runs 0   # quick, for trying out

Each run is a fresh `pytest tests/benchmarks/test_hot_paths.py` with the gate off (GRAPHSERVE_PERF_GATE=0) that
reports its ratios through GRAPHSERVE_PERF_RECORD. The loaded runs share the machine with one busy process, in turn
an interpreter loop and a numpy sort streaming 16 MB through the caches (a noisy CI neighbour); the stress runs
with both at once (2 busy processes on 2 cores). Run kinds are interleaved so that slow drifts hit all alike. The
baseline is the median of the quiet runs; the threshold comes from the quiet and loaded runs; the stress runs are
recorded and checked against it. Then it writes:

  perf/baselines/cpu_hot_paths.json         per hot path the median ratio of the quiet runs, the machine and
                                            versions, the threshold and how it was derived
  perf/baselines/cpu_hot_paths_spread.json  every run's ratios, each hot path's spread around its baseline, and
                                            the threshold derivation: the worst slowdown an unchanged run showed
                                            plus a margin (perf_gate.derive_threshold), refused if it could not
                                            catch a 1.5x slowdown in the fastest-looking run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from perf.common import git_sha
from tests.benchmarks import perf_gate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Busy neighbours: an interpreter loop and a numpy loop that streams memory through the shared caches.
_LOAD_SNIPPETS = [
    "x = 0\nwhile True:\n    x = (x * 31 + 7) % 1000003",
    "import numpy as np\na = np.random.rand(1 << 21)\nwhile True:\n    a = np.sort(a[::-1])",
]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs with no added load (the baseline's source)")
    parser.add_argument("--loaded-runs", type=int, default=6,
                        help="runs beside one busy neighbour (alternately each kind); in the threshold")
    parser.add_argument("--stress-runs", type=int, default=4,
                        help="runs beside both neighbours at once (2 busy processes): recorded and checked against "
                             "the threshold, not used to derive it")
    parser.add_argument("--margin", type=float, default=0.10, help="threshold = worst unchanged slowdown + margin")
    return parser.parse_args()


def _run_once(record_path: str) -> dict:
    """One pytest run of the hot paths with the gate off; returns its ratios, medians and CPU shares."""
    env = {**os.environ, perf_gate.ENV_GATE: "0", perf_gate.ENV_RECORD: record_path}
    env.pop(perf_gate.ENV_INJECT, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/benchmarks/test_hot_paths.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"benchmark run failed with status {proc.returncode}")
    with open(record_path) as f:
        record = json.load(f)
    results = record["results"]
    return {"machine": record["machine"], **{key: {name: r[field] for name, r in results.items()}
            for key, field in (("ratios", "ratio"), ("medians_s", "median_s"), ("cpu_share", "cpu_share"))}}


def _schedule(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """(kind, neighbour snippets) per run, the kinds interleaved so that slow drifts hit all of them alike."""
    queues = {"quiet": [[] for _ in range(args.runs)],
              "loaded": [[i % len(_LOAD_SNIPPETS)] for i in range(args.loaded_runs)],
              "stress": [list(range(len(_LOAD_SNIPPETS))) for _ in range(args.stress_runs)]}
    order = []
    while any(queues.values()):
        for kind, queue in queues.items():
            if queue:
                order.append((kind, queue.pop(0)))
    return order


def _measure(args: argparse.Namespace) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"quiet": [], "loaded": [], "stress": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, snippets) in enumerate(_schedule(args)):
            load = [subprocess.Popen([sys.executable, "-c", _LOAD_SNIPPETS[j]]) for j in snippets]
            try:
                time.sleep(0.5 if load else 0)  # let the neighbours get going
                start = time.perf_counter()
                run = _run_once(os.path.join(tmp, f"run{i}.json"))
            finally:
                for proc in load:
                    proc.kill()
                    proc.wait()
            runs[kind].append(run)
            ratios = " ".join(f"{k}={v:.4f}" for k, v in run["ratios"].items())
            print(f"run {i + 1} ({kind}, {time.perf_counter() - start:.1f} s): {ratios}", flush=True)
    return runs


def _spread_report(runs: dict[str, list[dict]], baseline_ratios: dict[str, float], margin: float) -> dict:
    """Spread per hot path and run kind, the derived threshold, and how the stress runs fare against it."""
    ratios = {kind: [r["ratios"] for r in rs] for kind, rs in runs.items()}
    spread = {kind: perf_gate.spread_summary(rs, baseline_ratios) for kind, rs in ratios.items() if rs}
    in_threshold = perf_gate.spread_summary(ratios["quiet"] + ratios["loaded"], baseline_ratios)
    worst = max(s["max_factor"] for s in in_threshold.values())
    fastest = min(s["min_factor"] for s in in_threshold.values())
    # Each hot path gets its own threshold from its own spread, so a quiet path is gated tightly and only a noisy
    # one (the whole engine step) gets a loose figure; each must still catch 1.5x in its fastest-looking run.
    thresholds = {name: perf_gate.derive_threshold(s["max_factor"], s["min_factor"], margin=margin)
                  for name, s in in_threshold.items()}
    threshold = max(thresholds.values())
    derivation = (f"per hot path: its worst slowdown of an unchanged run vs baseline over {len(ratios['quiet'])} "
                  f"quiet + {len(ratios['loaded'])} loaded runs, + margin {margin:.2f}, rounded up to 0.01, floor "
                  f"1.25, refused unless an injected 1.5x slowdown in its fastest-looking run would exceed it; "
                  f"loosest {threshold:.2f}x (worst slowdown overall {worst:.3f}x, fastest {fastest:.3f}x)")
    over = [f"stress run {i + 1}: {name} {r[name] / baseline_ratios[name]:.3f}x"
            for i, r in enumerate(ratios["stress"]) for name in r
            if r[name] / baseline_ratios[name] > thresholds[name]]
    for name in baseline_ratios:
        print(f"{name:18s} baseline {baseline_ratios[name]:.4f}  " + "  ".join(
            f"{kind} {s[name]['min_factor']:.3f}..{s[name]['max_factor']:.3f}" for kind, s in spread.items()))
    return {"spread": spread, "worst_slowdown": worst, "fastest_factor": fastest, "margin": margin,
            "threshold": threshold, "thresholds": thresholds,
            "threshold_derivation": derivation, "stress_first_attempts_over_threshold": over,
            "median_cpu_share": {kind: round(statistics.median(v for r in rs for v in r["cpu_share"].values()), 3)
                                 for kind, rs in runs.items() if rs}}


def main() -> None:
    """Measure, derive the threshold, write both JSON files."""
    args = _parse_args()
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3: the baseline is a median over runs")
    runs = _measure(args)
    quiet = runs["quiet"]
    names = list(quiet[0]["ratios"])
    baseline_ratios = {n: statistics.median(r["ratios"][n] for r in quiet) for n in names}
    report = _spread_report(runs, baseline_ratios, args.margin)
    recorded_on = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), **quiet[0]["machine"]}
    perf_gate.write_json(perf_gate.BASELINE_PATH, {
        "description": "CPU hot-path gate (tests/benchmarks): per hot path, the median CPU time of its rounds divided "
                       "by the median CPU time of the calibration rounds interleaved with them; median over the "
                       "quiet runs of perf/update_baseline.py. The gate fails when measured / baseline > the hot "
                       "path's threshold in the first measurement and in both confirmation measurements.",
        "refresh": perf_gate.REFRESH_COMMAND,
        "recorded_on": recorded_on,
        "threshold": report["threshold"],
        "thresholds": report["thresholds"],
        "threshold_derivation": report["threshold_derivation"] + " (details: cpu_hot_paths_spread.json)",
        "ratios": {n: round(v, 5) for n, v in baseline_ratios.items()},
        "median_round_ms": {n: round(statistics.median(r["medians_s"][n] for r in quiet) * 1e3, 4) for n in names},
    })
    perf_gate.write_json(perf_gate.SPREAD_PATH, {
        "description": "Run-to-run spread of the normalised ratios behind cpu_hot_paths.json's threshold: factor = "
                       "run ratio / baseline ratio (baseline = median of the quiet runs); min..max per run kind. "
                       "quiet: nothing added (other jobs on the machine kept running); loaded: one busy neighbour "
                       "process, alternately an interpreter loop and a numpy sort streaming 16 MB; stress: both.",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "recorded_on": recorded_on,
        **report,
        "runs": {kind: [{n: round(v, 5) for n, v in r["ratios"].items()} for r in rs] for kind, rs in runs.items()},
    })
    print(f"threshold {report['threshold']:.2f}x ({report['threshold_derivation']})")
    print(f"wrote {perf_gate.BASELINE_PATH} and {perf_gate.SPREAD_PATH}")


if __name__ == "__main__":
    main()
