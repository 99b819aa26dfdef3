"""Quantized checkpoints that cannot be served fail before any weight reaches the device, naming the field or the
tensor; a forced method must match the checkpoint; the quantized layers compile into one graph."""
from __future__ import annotations

import argparse

import pytest
import torch

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs
from graphserve.models import loader
from tests.quantization.quant_testutils import (
    drop_tensor,
    set_quant_field,
    truncate_tensor,
    write_quantized_checkpoint,
)

QPROJ = "model.layers.1.self_attn.q_proj"


@pytest.fixture
def no_device_allocation(monkeypatch):
    """Fail the test if the engine gets as far as allocating the model's weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were allocated before the checkpoint was found unusable")

    monkeypatch.setattr(loader, "materialize_meta_module", refuse)


def _checkpoint(tiny_model, tmp_path, method="gptq", **options) -> str:
    path = str(tmp_path / method)
    write_quantized_checkpoint(tiny_model("llama")[0], path, method, **options)
    return path


@pytest.mark.parametrize("field,value,match", [
    ("bits", 5, "GPTQ bits=5 is not supported"),
    ("group_size", 48, "group_size=48 is not supported"),
    ("checkpoint_format", "marlin", "checkpoint_format='marlin' is not supported"),
    ("lm_head", True, "lm_head=true"),
])
def test_unsupported_config_fields_are_named(tiny_model, tmp_path, no_device_allocation, field, value, match):
    path = _checkpoint(tiny_model, tmp_path)
    set_quant_field(path, field, value)
    with pytest.raises(ValueError, match=match):
        LLM(path, dtype="float32")


def test_group_size_that_does_not_divide_the_input(tiny_model, tmp_path, no_device_allocation):
    """96 is a valid group size, but not of the 64-wide hidden state."""
    path = _checkpoint(tiny_model, tmp_path)
    set_quant_field(path, "group_size", 96)
    with pytest.raises(ValueError, match="group_size 96 does not divide the input size 64"):
        LLM(path, dtype="float32")


def test_truncated_and_missing_tensors_are_named(tiny_model, tmp_path, no_device_allocation):
    path = _checkpoint(tiny_model, tmp_path, "awq", group_size=32)
    truncate_tensor(path, f"{QPROJ}.qweight")
    with pytest.raises(ValueError, match=rf"'{QPROJ}.qweight' has shape \[32, 8\]; awq .* expects \[64, 8\]"):
        LLM(path, dtype="float32")
    path = _checkpoint(tiny_model, tmp_path / "2", "awq", group_size=32)
    drop_tensor(path, "model.layers.0.mlp.up_proj.scales")
    with pytest.raises(ValueError, match="no tensor 'model.layers.0.mlp.up_proj.scales', which awq needs"):
        LLM(path, dtype="float32")


def test_forced_method_must_match_the_checkpoint(tiny_model, tmp_path):
    path = _checkpoint(tiny_model, tmp_path, "awq", group_size=32)
    with pytest.raises(ValueError, match="--quantization gptq was given, but the checkpoint is quantized with awq"):
        LLM(path, dtype="float32", quantization="gptq")
    assert LLM(path, dtype="float32", quantization="awq").llm_engine.model_config.quantization == "awq"
    plain = tiny_model("llama")[0]
    with pytest.raises(ValueError, match="has no quantization config"):
        LLM(plain, dtype="float32", quantization="awq")
    with pytest.raises(ValueError, match="not supported; choose one of"):
        EngineArgs(model=path, quantization="bitsandbytes").create_engine_config()
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--quantization", "AWQ"]).quantization == "awq"


def test_unknown_quant_method_in_the_checkpoint_is_refused(tiny_model, tmp_path, no_device_allocation):
    path = _checkpoint(tiny_model, tmp_path)
    set_quant_field(path, "quant_method", "bitsandbytes")
    with pytest.raises(ValueError, match="quantization method 'bitsandbytes' is not supported"):
        LLM(path, dtype="float32")


def test_act_order_shards_of_one_input_must_agree(tiny_model, tmp_path):
    """q, k and v read the same input, so GPTQ gives them one act-order: a checkpoint where they differ is refused."""
    path = _checkpoint(tiny_model, tmp_path, "gptq", bits=4, group_size=32, desc_act=True)
    from tests.quantization.quant_testutils import load_checkpoint_tensors, replace_tensor

    g_idx = load_checkpoint_tensors(path)["model.layers.0.self_attn.k_proj.g_idx"]
    replace_tensor(path, "model.layers.0.self_attn.k_proj.g_idx", g_idx.flip(0).contiguous())
    with pytest.raises(ValueError, match=r"self_attn\.[qkv]_proj\.g_idx.*differs from shard"):
        LLM(path, dtype="float32")


def test_quantized_model_compiles_into_one_graph(tiny_model, tmp_path):
    """The quantized GEMM is an opaque op: torch.compile(fullgraph=True) gives eager's tokens, no recompile."""
    from graphserve.compile.counters import compilation_counter

    path = _checkpoint(tiny_model, tmp_path, "gptq", bits=4, group_size=32, desc_act=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
    prompts = [[5, 6, 7], list(range(10, 40))]
    eager = LLM(path, dtype="float32").generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    before = compilation_counter.snapshot()
    compiled = LLM(path, dtype="float32", compile=True)
    outputs = compiled.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert compilation_counter.since(before)["num_graphs_compiled"] == 1
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in eager]


@pytest.mark.parametrize("method", ["awq", "gptq", "squeezellm"])
def test_dummy_weights_take_the_forced_method(tmp_path, method):
    """A bare config.json with --load-format dummy and --quantization (the benchmarks' quantized Llama-3-8B):
    4 bits, groups of 128, random packed codes; the layers really are quantized."""
    from perf.tiny_checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint(str(tmp_path), "llama", weights=False, hidden_size=128, intermediate_size=256)
    llm = LLM(str(tmp_path), load_format="dummy", quantization=method, dtype="float32")
    layer = llm.llm_engine.engine_core.model_executor.model_runner.model.model.layers[0].mlp.down_proj
    assert type(layer.quant_method).__name__.lower().startswith(method)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (256 // 8, 128)
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=4, temperature=0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
