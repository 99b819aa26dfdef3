"""CPU hot-path microbenchmarks, gated against perf/baselines/cpu_hot_paths.json (see perf_gate.py).

Each test builds one hot path (bench_workloads.py) and hands it to the harness, which times it with
pytest-benchmark, divides its median by the interleaved calibration's median and fails when that ratio is more
than the baseline's threshold slower than the recorded one. `-m "not benchmark"` deselects them all.
"""
import functools

import bench_workloads
import perf_gate
import pytest

pytestmark = pytest.mark.benchmark(group="cpu-hot-paths", timer=perf_gate.TIMER)


def test_scheduler_step(benchmark, perf_gate_session):
    """Scheduler.schedule() + update_from_output() at 256 running decode requests."""
    perf_gate_session.measure(benchmark, bench_workloads.scheduler_step)


def test_input_prepare(benchmark, perf_gate_session):
    """InputBatch.prepare for 256 decode requests."""
    perf_gate_session.measure(benchmark, bench_workloads.input_prepare)


def test_sampling_metadata(benchmark, perf_gate_session):
    """build_sampling_metadata for 256 decode requests with mixed greedy / top-p / top-k / seeded settings."""
    perf_gate_session.measure(benchmark, bench_workloads.sampling_metadata)


def test_sampler(benchmark, perf_gate_session):
    """Sampler on 64 x 1024 float32 logits with mixed greedy / top-p / top-k / seeded rows."""
    perf_gate_session.measure(benchmark, bench_workloads.sampler)


def test_detokenizer(benchmark, perf_gate_session):
    """IncrementalDetokenizer over 64 sequences, one token per step."""
    perf_gate_session.measure(benchmark, bench_workloads.detokenizer)


def test_engine_step(benchmark, perf_gate_session, tiny_model):
    """LLMEngine.step() of a tiny random Llama (fp32) decoding 8 requests."""
    checkpoint_dir, _ = tiny_model("llama")
    perf_gate_session.measure(benchmark, functools.partial(bench_workloads.engine_step, checkpoint_dir))
