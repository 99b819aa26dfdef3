"""FP8 W8A8: the quantization helpers against the e4m3 definition, the scaled GEMM op's reference, and tiny models
served with `--quantization fp8` (quantized at load) or from FP8 checkpoints (HF "fp8" and compressed-tensors),
token for token against transformers running the same FP8-rounded weights with each projection's input rounded
through FP8 at the same point."""
from __future__ import annotations

import json

import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs
from graphserve.ops import fp8 as fp8_ops
from tests.quantization.fp8_testutils import (
    fake_quant_reference,
    fp8_round,
    online_reference_weights,
    write_fp8_checkpoint,
)

NEW_TOKENS = 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, 512, (n,), generator=g).tolist() for n in (3, 17, 40)]


@torch.no_grad()
def _hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _served(path: str, **kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(path, dtype="float32", max_num_batched_tokens=32, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_quantize_saturates_rounds_and_never_makes_nan():
    x = torch.tensor([[0.0, 1.0, -3.0, 1000.0, -1e9, 447.9, 0.0013]])
    q = fp8_ops.quantize_fp8(x, torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [[0.0, 1.0, -3.0, 448.0, -448.0, 448.0, 2.0 ** -9]]  # the smallest subnormal
    assert not torch.isnan(fp8_ops.quantize_fp8(torch.tensor([float("inf"), -float("inf")]), torch.tensor(1.0))
                           .float()).any()
    # Per-token scales map each row's largest magnitude to 448 exactly; an all-zero row stays zero.
    rows = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    scales = fp8_ops.per_token_scales(rows)
    assert scales[0, 0].item() == pytest.approx(2.0 / 448) and scales[1, 0].item() > 0
    q = fp8_ops.quantize_fp8(rows, scales)
    assert q.float()[0, 1].item() == -448.0 and q.float()[1].abs().sum().item() == 0.0
    w = torch.randn(6, 16) * torch.arange(1, 7).view(6, 1)
    assert torch.allclose(fp8_ops.per_channel_scales(w), w.abs().amax(1) / 448)
    # e4m3 keeps 3 mantissa bits: the round trip is within 2^-4 relative of each value.
    scale = fp8_ops.per_channel_scales(w)[:, None]
    err = (fp8_ops.quantize_fp8(w, scale).float() * scale - w).abs()
    assert bool((err <= w.abs() * 2 ** -4 + scale * 2 ** -9).all())


def test_scaled_mm_reference_is_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 32, generator=g), torch.randn(12, 32, generator=g)
    x_scale, w_scale = fp8_ops.per_token_scales(x), fp8_ops.per_channel_scales(w)
    x_q, w_q = fp8_ops.quantize_fp8(x, x_scale), fp8_ops.quantize_fp8(w, w_scale[:, None])
    out = torch.empty(5, 12)
    torch.ops.graphserve.fp8_scaled_mm(out, x_q, x_scale, w_q, w_scale)
    expected = (fp8_round(x, x.abs().amax(-1, keepdim=True) / 448)
                @ fp8_round(w, w.abs().amax(1, keepdim=True) / 448).t())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    static = torch.tensor([0.05])  # one static input scale
    torch.ops.graphserve.fp8_scaled_mm(out, fp8_ops.quantize_fp8(x, static), static, w_q, w_scale)
    torch.testing.assert_close(out, fp8_round(x, static) @ (w_q.float() * w_scale[:, None]).t(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_at_load_matches_transformers_on_fp8_rounded_weights(tiny_model, arch):
    path, hf_model = tiny_model(arch)
    llm, got = _served(path, quantization="fp8")
    model = llm.llm_engine.engine_core.model_executor.model_runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.output_size,)
    reference = fake_quant_reference(hf_model, online_reference_weights(hf_model))
    assert got == [_hf_greedy(reference, p) for p in _prompts()]


@pytest.mark.parametrize("case", [("tensor", "dynamic", "fp8"), ("tensor", "static", "fp8"),
                                  ("channel", "dynamic", "compressed-tensors"),
                                  ("tensor", "static", "compressed-tensors")])
def test_fp8_checkpoints_match_transformers(tiny_model, tmp_path, case):
    """Per-tensor scales per shard (fused q/k/v and gate/up keep each shard's scale), per-channel scales, static
    input scales (the largest of a fused group), dynamic per-token ones."""
    strategy, scheme, config_format = case
    path, hf_model = tiny_model("llama")
    reference_tensors = write_fp8_checkpoint(path, str(tmp_path), strategy, scheme, config_format)
    llm, got = _served(str(tmp_path))
    assert llm.llm_engine.model_config.quantization == config_format
    reference = fake_quant_reference(hf_model, reference_tensors, scheme)
    assert got == [_hf_greedy(reference, p) for p in _prompts()]


def test_fp8_config_errors(tiny_model, tmp_path):
    path, _ = tiny_model("llama")
    write_fp8_checkpoint(path, str(tmp_path / "block"))
    config_file = tmp_path / "block" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["weight_block_size"] = [128, 128]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size"):
        EngineArgs(model=str(tmp_path / "block")).create_engine_config()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "sometimes"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_scheme"):
        EngineArgs(model=str(tmp_path / "block")).create_engine_config()
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not FP8 W8A8"):
        EngineArgs(model=str(tmp_path / "block")).create_engine_config()
    weight_only = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
    config["quantization_config"]["config_groups"] = {"g": weight_only}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight-only FP8"):
        EngineArgs(model=str(tmp_path / "block")).create_engine_config()
    config["quantization_config"]["config_groups"] = {"g": {**weight_only, "input_activations": {
        "num_bits": 8, "type": "float", "dynamic": True, "strategy": "tensor"}}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dynamic per tensor are not supported"):
        EngineArgs(model=str(tmp_path / "block")).create_engine_config()
    with pytest.raises(ValueError, match="quantized with compressed-tensors"):
        EngineArgs(model=str(tmp_path / "block"), quantization="fp8").create_engine_config()


def test_fp8_checkpoint_with_a_bad_or_missing_scale_fails_naming_it(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = tiny_model("llama")
    write_fp8_checkpoint(path, str(tmp_path / "bad"))
    file = tmp_path / "bad" / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    tensors[name] = torch.ones(3)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="k_proj.weight_scale"):
        LLM(str(tmp_path / "bad"), dtype="float32")
    del tensors[name]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="qkv_proj.weight_scale"):
        LLM(str(tmp_path / "bad"), dtype="float32")
