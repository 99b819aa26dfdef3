"""The roofline arithmetic of the benchmarks on the real Llama-3-8B shape (built on the meta device: no memory)."""
import os

import pytest
import torch

from graphserve.benchmarks.roofline import causal_pairs, device_ceilings, fraction, model_cost

LLAMA_8B_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "perf", "configs", "llama-3-8b")


def test_llama_8b_costs_match_the_performance_doc(tmp_path):
    from graphserve.benchmarks.tokenizer import build_tokenizer
    from graphserve.models.config_loader import create_model_config
    from graphserve.models.loader import resolve_model_cls, set_default_dtype

    build_tokenizer().save_pretrained(tmp_path)
    mc = create_model_config(LLAMA_8B_DIR, dtype="bfloat16", load_format="dummy", tokenizer=str(tmp_path))
    with set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = resolve_model_cls(mc.architecture)(mc)
    cost = model_cost(model, mc)
    # ../shared/docs/performance.md: 8.03 B parameters, 15.01 GB read per decode step, 128 KiB of KV per token,
    # 15.0 GFLOP per decoded token, a 1 k prompt ≈ 18 ms of prefill at 801 TFLOP/s.
    assert cost.num_params == pytest.approx(8.03e9, rel=1e-3)
    assert cost.decode_weight_bytes == pytest.approx(15.01e9, rel=1e-3)
    assert cost.kv_bytes_per_token == 128 * 1024
    assert cost.decode_step_flops([1]) == pytest.approx(15.0e9, rel=1e-2)
    h200 = device_ceilings("NVIDIA H200")
    assert cost.prefill_flops(1024) / h200.flop_per_s == pytest.approx(18e-3, rel=0.05)
    assert cost.decode_step_bytes([16]) / h200.bytes_per_s == pytest.approx(3.53e-3, rel=1e-2)  # 283 tok/s


def test_ceilings_only_for_measured_devices():
    assert device_ceilings("NVIDIA H200").bytes_per_s == 4.25e12
    assert device_ceilings("NVIDIA H200").flop_per_s == 801e12
    for unmeasured in ("AMD EPYC 7B13", "NVIDIA A100-SXM4-80GB", "NVIDIA H200 NVL"):
        assert device_ceilings(unmeasured) is None
    assert fraction(2.0, None) is None and fraction(None, 4.0) is None and fraction(1.0, 4.0) == 0.25


def test_causal_pairs_with_and_without_window():
    assert causal_pairs(4, 4) == 1 + 2 + 3 + 4
    assert causal_pairs(2, 6) == 5 + 6  # a chunk after a 4-token cached prefix
    assert causal_pairs(4, 4, window=2) == 1 + 2 + 2 + 2
    brute = sum(1 for q in range(7, 10) for k in range(10) if k <= q and q - k < 5)  # 3 queries at 7..9, window 5
    assert causal_pairs(3, 10, window=5) == brute == 15
