"""Multi-LoRA on the GPU: the Triton LoRA ops at Llama-3-8B shapes against the torch reference (also replayed from
a CUDA graph with new slot maps), and tiny Llamas with adapters served with compile + decode graphs + async
scheduling, token-identical to transformers + peft, with no recompile or recapture when adapters change."""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import (
    EngineRun,
    assert_compiled_once_and_captured,
    counting_compiles,
    rel_err,
    release_device_memory,
)

from graphserve import LLM, LoRARequest, SamplingParams
from graphserve.ops._register import get_op
from graphserve.ops.lora import lora_token_metadata

# (name, H_in, output slices) of Llama-3-8B
SHAPES = [("qkv_proj", 4096, [4096, 1024, 1024]), ("gate_up_proj", 4096, [14336, 14336]),
          ("down_proj", 14336, [4096])]
SLOTS, RANK = 8, 16


def _operands(h_in: int, slices: list[int], tokens: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, h_in, device="cuda", generator=g).bfloat16()
    lora_a = (torch.randn(SLOTS, len(slices) * RANK, h_in, device="cuda", generator=g) * 0.02).bfloat16()
    lora_b = (torch.randn(SLOTS, sum(slices), RANK, device="cuda", generator=g) * 0.02).bfloat16()
    token_lora = torch.randint(-1, SLOTS, (tokens,), generator=torch.Generator().manual_seed(seed),
                               dtype=torch.int32)
    token_lora[0] = 3  # at least one row through an adapter (a single -1 row would compare zeros with zeros)
    return x, lora_a, lora_b, token_lora


def _meta(token_lora: torch.Tensor):
    sorted_ids, ids, starts = lora_token_metadata(token_lora, SLOTS)
    return [t.cuda() for t in (token_lora, sorted_ids, ids, starts)]


@pytest.mark.parametrize("name,h_in,slices", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("tokens", [1, 64, 300])
def test_lora_ops_match_reference(cuda_kernels, name, h_in, slices, tokens):
    x, lora_a, lora_b, token_lora = _operands(h_in, slices, tokens, seed=tokens + h_in)
    meta = _meta(token_lora)
    offsets = [0]
    for size in slices:
        offsets.append(offsets[-1] + size)
    buf = torch.empty(tokens, len(slices) * RANK, device="cuda")
    torch.ops.graphserve.lora_shrink(buf, x, lora_a, *meta)
    ref_buf = torch.empty_like(buf)
    get_op("lora_shrink").reference(ref_buf, x, lora_a, *meta)
    assert rel_err(buf, ref_buf) < 1e-2
    y0 = torch.randn(tokens, sum(slices), device="cuda").bfloat16()
    y, ref_y = y0.clone(), y0.float()
    torch.ops.graphserve.lora_expand(y, ref_buf, lora_b, *meta, offsets)
    get_op("lora_expand").reference(ref_y, ref_buf, lora_b, *meta, offsets)
    assert rel_err(y, ref_y) < 1e-2
    # The delta alone, within the bf16 rounding of y (~0.4 % of |y|) seen against a delta ~10x smaller than y.
    assert rel_err(y.float() - y0.float(), ref_y - y0.float()) < 5e-2


def test_lora_ops_replay_from_a_graph_with_new_slot_maps(cuda_kernels):
    """The slot map is a graph input: the captured ops follow new maps (and -1 rows) without recapture."""
    _, h_in, slices = SHAPES[0]
    tokens = 32
    x, lora_a, lora_b, token_lora = _operands(h_in, slices, tokens, seed=7)
    meta = _meta(token_lora)
    buf = torch.empty(tokens, len(slices) * RANK, device="cuda")
    torch.ops.graphserve.lora_shrink(buf, x, lora_a, *meta)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.graphserve.lora_shrink(buf, x, lora_a, *meta)
    for seed in range(3):
        new_map = torch.randint(-1, SLOTS, (tokens,), generator=torch.Generator().manual_seed(seed),
                                dtype=torch.int32)
        for dst, src in zip(meta, _meta(new_map)):
            dst.copy_(src)
        graph.replay()
        ref = torch.empty_like(buf)
        get_op("lora_shrink").reference(ref, x, lora_a, *meta)
        assert rel_err(buf, ref) < 1e-2


# (compile, graphs): the GPU defaults, graphs over the eager model, and neither; a failure names the rows that differ
MODES = {"compile+graphs": dict(), "eager+graphs": dict(compile=False), "eager": dict(enforce_eager=True)}


def _row_diffs(got: list[list[int]], expected: list[list[int]], names: list) -> list[str]:
    """One line per row whose tokens differ: its adapter, the first differing index, both sequences."""
    lines = []
    for row, (g, e, name) in enumerate(zip(got, expected, names)):
        if g != e:
            first = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e)))
            lines.append(f"row {row} (adapter {name}): first difference at token {first}: {g} != {e}")
    return lines


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_llama_adapters_with_graphs_match_peft(needs_cuda, tiny_model, tmp_path, mode, async_scheduling):
    """fp32, two adapters and base rows in one batch, served with compile and/or decode graphs, async scheduling on
    or off: token-identical to transformers + peft on the same GPU."""
    from tests.lora.lora_testutils import reference_greedy, write_peft_adapter

    path, hf_model = tiny_model("llama")
    specs = {"a": dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=16, seed=1),
             "b": dict(r=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], lora_alpha=8, seed=2)}
    peft_models, loras = {}, {}
    for i, (name, spec) in enumerate(specs.items(), start=1):
        peft_models[name] = write_peft_adapter(hf_model, str(tmp_path / name), **spec)
        loras[name] = LoRARequest(name, i, str(tmp_path / name))
    prompts = [[5, 6, 7], list(range(10, 50)), list(range(100, 117)), [9, 8, 7, 6]]
    names = [None, "a", "b", "a"]
    # The reference runs on the same GPU (a CPU reference differs by fp32 rounding enough to flip near-ties).
    references = {n: (hf_model if n is None else peft_models[n]).cuda() for n in set(names)}
    expected = [reference_greedy(references[n], p, 12) for n, p in zip(names, prompts)]
    hf_model.cpu()
    del references
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    with counting_compiles() as startup:
        llm = LLM(path, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
                  cuda_graph_sizes=[1, 2, 4], max_num_seqs=4, async_scheduling=async_scheduling, **MODES[mode])
    with counting_compiles() as serving:
        for order in (names, names[::-1]):  # adapters change slots and rows; nothing recompiles or recaptures
            outputs = llm.generate(prompt_token_ids=prompts if order is names else prompts[::-1],
                                   sampling_params=params, use_tqdm=False,
                                   lora_request=[None if n is None else loras[n] for n in order])
            got = [o.outputs[0].token_ids for o in outputs]
            want = expected if order is names else expected[::-1]
            diffs = _row_diffs(got, want, order)
            assert not diffs, "\n".join(diffs)
    run = EngineRun(startup=startup, serving=serving)
    assert_compiled_once_and_captured(run, compiled=mode == "compile+graphs", num_graphs=0 if mode == "eager" else 3)
    del llm
    release_device_memory()
