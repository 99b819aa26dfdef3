"""The gate's own logic (perf_gate.py), without timing anything: normalisation, comparison, messages, the
slowdown hook, the threshold derivation and when a baseline applies."""
import json

import perf_gate
import pytest

BASELINE = {"threshold": 1.25, "ratios": {"scheduler": 0.8, "sampler": 2.0}}


def test_normalise_is_ratio_of_medians():
    assert perf_gate.normalise(3e-3, 2e-3) == pytest.approx(1.5)
    m = perf_gate.Measurement.from_samples([1.0, 9.0, 3.0], [2.0, 1.0, 100.0], cpu_share=0.9)
    assert (m.median_s, m.calibration_median_s) == (3.0, 2.0)
    assert m.ratio == pytest.approx(1.5)
    with pytest.raises(ValueError):
        perf_gate.normalise(0.0, 1.0)


def test_same_slowdown_on_hot_path_and_calibration_cancels():
    """A uniformly slower machine moves both medians: the ratio, and so the verdict, stay put."""
    fast = perf_gate.normalise(2e-3, 4e-3)
    slow = perf_gate.normalise(2e-3 * 1.7, 4e-3 * 1.7)
    assert slow == pytest.approx(fast)


@pytest.mark.parametrize("measured, passed", [(0.8, True), (0.5, True), (0.8 * 1.25, True), (0.8 * 1.26, False),
                                              (1.2, False)])
def test_compare_against_threshold(measured, passed):
    verdict = perf_gate.compare("scheduler", measured, BASELINE)
    assert verdict.passed is passed
    assert verdict.slowdown == pytest.approx(measured / 0.8)
    assert (verdict.baseline_ratio, verdict.threshold) == (0.8, 1.25)


def test_a_hot_path_with_its_own_threshold_is_judged_by_it():
    baseline = {**BASELINE, "thresholds": {"scheduler": 1.20, "sampler": 1.40}}
    assert not perf_gate.compare("scheduler", 0.8 * 1.22, baseline).passed  # within the global 1.25, not its own
    assert perf_gate.compare("sampler", 2.0 * 1.35, baseline).passed
    assert perf_gate.compare("scheduler", 0.8 * 1.22, BASELINE).passed  # no per-path entry: the global one


def test_compare_unknown_hot_path_names_it():
    with pytest.raises(KeyError, match="'engine_step'.*update_baseline"):
        perf_gate.compare("engine_step", 1.0, BASELINE)


def test_failure_message_names_path_ratios_and_factor():
    verdict = perf_gate.compare("scheduler", 1.2, BASELINE)
    attempts = [perf_gate.Measurement(6e-3, 5e-3, 0.97), perf_gate.Measurement(6.5e-3, 5e-3, 0.5)]
    message = perf_gate.failure_message(verdict, attempts, {"python": "3.11.9", "cpu": "AMD EPYC"})
    first = message.splitlines()[0]
    assert "'scheduler'" in first and "1.50x slower" in first and "threshold 1.25x" in first
    assert "1.2000" in first and "0.8000" in first
    assert "6.500 ms / 5.000 ms = 1.3000 (1.62x baseline), CPU share 50%" in message
    assert "python=3.11.9" in message and perf_gate.REFRESH_COMMAND in message


def test_parse_slowdowns():
    known = ["scheduler", "sampler"]
    assert perf_gate.parse_slowdowns(None, known) == {}
    assert perf_gate.parse_slowdowns(" ", known) == {}
    assert perf_gate.parse_slowdowns("scheduler:1.5, sampler:2", known) == {"scheduler": 1.5, "sampler": 2.0}
    for bad, match in [("scheduler", "NAME:FACTOR"), ("nope:1.5", "unknown hot path 'nope'"),
                       ("sampler:fast", "must be a number"), ("sampler:0.5", ">= 1")]:
        with pytest.raises(ValueError, match=match):
            perf_gate.parse_slowdowns(bad, known)


def test_slowed_spins_for_the_extra_time():
    """With a fake clock: the call itself takes 2 units, so a 1.5x slowdown must spin until 1 more has passed."""
    clock = {"t": 0.0}

    def timer():
        clock["t"] += 0.25  # every reading advances time, as the spinning loop does
        return clock["t"]

    def work():
        clock["t"] += 2.0
        return "result"

    start = clock["t"]
    assert perf_gate.slowed(work, 1.5, timer=timer)() == "result"
    elapsed = clock["t"] - start
    assert 3.0 <= elapsed <= 3.0 + 4 * 0.25
    assert perf_gate.slowed(work, 1.0) is work


def test_gate_enabled_switch():
    assert perf_gate.gate_enabled({})
    assert perf_gate.gate_enabled({perf_gate.ENV_GATE: "1"})
    for off in ("0", "false", "OFF", "no"):
        assert not perf_gate.gate_enabled({perf_gate.ENV_GATE: off})


def test_baseline_applies_only_to_same_cpu_and_python_torch_minor():
    recorded = {"python": "3.11.9", "torch": "2.13.0+cpu", "cpu": "AMD EPYC"}
    assert perf_gate.baseline_mismatch(recorded, {"python": "3.11.4", "torch": "2.13.1", "cpu": "AMD EPYC"}) is None
    reason = perf_gate.baseline_mismatch(recorded, {"python": "3.12.1", "torch": "2.13.0+cpu", "cpu": "AMD EPYC"})
    assert "python 3.11.9" in reason and "3.12.1" in reason
    assert "torch" in perf_gate.baseline_mismatch(recorded, {"python": "3.11.9", "torch": "2.14.0", "cpu": "AMD EPYC"})
    assert "'Intel Xeon'" in perf_gate.baseline_mismatch(recorded, {"python": "3.11.9", "torch": "2.13.0",
                                                                     "cpu": "Intel Xeon"})


def test_spread_summary_and_threshold_derivation():
    base = {"scheduler": 1.0, "sampler": 2.0}
    runs = [{"scheduler": 1.02, "sampler": 1.9}, {"scheduler": 1.12, "sampler": 2.1}, {"scheduler": 0.97}]
    summary = perf_gate.spread_summary(runs, base)
    assert summary["scheduler"] == {"min_factor": 0.97, "max_factor": 1.12, "num_runs": 3}
    assert summary["sampler"] == {"min_factor": 0.95, "max_factor": 1.05, "num_runs": 2}
    # worst + margin 0.10, rounded up to 0.01; the floor wins for quiet hot paths.
    assert perf_gate.derive_threshold(1.12, 0.95) == pytest.approx(1.25)
    assert perf_gate.derive_threshold(1.02, 0.98) == pytest.approx(1.25)
    assert perf_gate.derive_threshold(1.151, 0.95) == pytest.approx(1.26)
    # Too noisy to catch 1.5x in the fastest-looking run: refused.
    with pytest.raises(ValueError, match="would not catch"):
        perf_gate.derive_threshold(1.30, 0.90)


def test_committed_baseline_is_consistent():
    """The committed baseline covers every hot path and its threshold is what its spread file derives."""
    import bench_workloads

    baseline = perf_gate.load_baseline()
    assert baseline is not None, f"{perf_gate.BASELINE_PATH} is missing"
    assert set(baseline["ratios"]) == set(bench_workloads.HOT_PATHS)
    assert all(r > 0 for r in baseline["ratios"].values())
    with open(perf_gate.SPREAD_PATH) as f:
        spread = json.load(f)
    assert spread["threshold"] == baseline["threshold"]
    assert 1.0 < baseline["threshold"] < 1.5
    # Per hot path: the same rule over its own spread; the global threshold is the loosest of them.
    in_threshold = perf_gate.spread_summary(spread["runs"]["quiet"] + spread["runs"]["loaded"], baseline["ratios"])
    assert set(baseline["thresholds"]) == set(baseline["ratios"])
    for name, threshold in baseline["thresholds"].items():
        s = in_threshold[name]
        assert threshold == pytest.approx(perf_gate.derive_threshold(s["max_factor"], s["min_factor"],
                                                                     margin=spread["margin"]))
    assert max(baseline["thresholds"].values()) == pytest.approx(baseline["threshold"])


# The scheduler's baseline: ratio 0.8 with a 4 ms median round, so its calibration took 5 ms then.
RECORDED = {**BASELINE, "median_round_ms": {"scheduler": 4.0}}


def _attempt(ratio: float, calibration_ms: float = 5.0, spread: float = 0.05, cpu_share: float = 1.0):
    return perf_gate.Measurement(ratio * calibration_ms / 1e3, calibration_ms / 1e3, cpu_share, spread)


def test_relative_spread():
    assert perf_gate.relative_spread([1.0] * 20) == 0.0
    assert perf_gate.relative_spread([1.0] * 10 + [2.0] * 10) > 0.5
    assert perf_gate.relative_spread([1.0, 2.0]) == 0.0  # too few rounds to say


def test_unreliable_reasons_name_what_was_off():
    reference = perf_gate.baseline_calibration_s("scheduler", RECORDED)
    assert reference == pytest.approx(5e-3)
    assert perf_gate.unreliable_reasons(_attempt(0.8), reference, load_average=0.5, num_cpus=2) == []
    reasons = perf_gate.unreliable_reasons(_attempt(0.8, calibration_ms=8.0, spread=0.5, cpu_share=0.6), reference,
                                           load_average=3.5, num_cpus=2)
    assert len(reasons) == 4
    assert "1.60x its time" in reasons[0] and "varied by 50%" in reasons[1]
    assert "60% of a CPU" in reasons[2] and "load average 3.5" in reasons[3]


def test_clean_measurements_are_judged_strictly():
    """A 1.5x slowdown on a machine like the baseline's fails, however the other attempts went."""
    outcome, verdict, _ = perf_gate.judge("scheduler", [_attempt(1.2), _attempt(1.25, calibration_ms=9.0)], RECORDED,
                                          0.5, 2)
    assert outcome == "fail" and verdict.slowdown == pytest.approx(1.5)
    assert perf_gate.judge("scheduler", [_attempt(0.85)], RECORDED, 0.5, 2)[0] == "pass"


def test_disturbed_measurements_are_inconclusive_below_a_gross_slowdown():
    """The calibration ran 1.6x slower than when recorded: a 1.5x reading is within that machine's noise."""
    outcome, verdict, reasons = perf_gate.judge("scheduler", [_attempt(1.2, calibration_ms=8.0)] * 3, RECORDED, 0.5, 2)
    assert outcome == "inconclusive" and reasons == ["the calibration ran at 1.60x its time when the baseline was "
                                                     "recorded"]
    assert perf_gate.judge("scheduler", [_attempt(1.7, calibration_ms=8.0)], RECORDED, 0.5, 2)[0] == "fail"  # 2.1x
    loaded = perf_gate.judge("scheduler", [_attempt(1.2)], RECORDED, load_average=4.0, num_cpus=2)
    assert loaded[0] == "inconclusive" and "load average 4.0" in loaded[2][0]
