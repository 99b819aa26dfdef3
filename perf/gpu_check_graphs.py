"""GPU check of the graph engine (torch.compile + decode CUDA graphs); correctness first, one JSON record.

(a) tiny random models (built here with transformers, fp32): graphserve greedy vs transformers on the same
    GPU, with the defaults (compile + graphs) and with enforce_eager;
(b) the number of graphs captured at start-up, one compiled graph, and no recompile or capture while serving;
(c) a small Llama-shaped model in bf16 (head_dim 128, GQA 4:1, transformers' random init): 16 prompts of
    mixed lengths, compile + graphs vs graphs of the eager forward vs enforce_eager, greedy tokens compared;
    then the `load_format="dummy"` path from a bare config.json (what the Llama-3-8B benchmarks use).

    PYTHONPATH=$PWD python3 perf/gpu_check_graphs.py --out $OUT/gpu_check_graphs.json
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from graphserve import LLM, SamplingParams  # noqa: E402
from graphserve.compile.counters import compilation_counter, dynamo_counts  # noqa: E402
from perf.common import write_record  # noqa: E402
from perf.tiny_checkpoint import build_tokenizer, write_tiny_checkpoint  # noqa: E402

START = time.perf_counter()
LOG_LINES: list[str] = []
DEVICE = "cuda"  # --device cpu dry-runs the logic on a machine without a GPU


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG_LINES.append(f"{time.perf_counter() - START:7.1f}s {record.name}: {record.getMessage()}")


def _prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lens]


def _free(llm) -> None:
    del llm
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _serve(llm, prompts, params) -> tuple[list, dict, float]:
    """Generate and return (outputs, counter deltas while serving, seconds)."""
    before, dyn = compilation_counter.snapshot(), dynamo_counts()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    _sync()
    delta = compilation_counter.since(before)
    delta["dynamo_unique_graphs"] = dynamo_counts()["unique_graphs"] - dyn["unique_graphs"]
    return outs, delta, time.perf_counter() - start


def _build(path: str, **kwargs) -> tuple[LLM, dict]:
    before, dyn = compilation_counter.snapshot(), dynamo_counts()
    start = time.perf_counter()
    llm = LLM(path, device=DEVICE, **kwargs)
    info = compilation_counter.since(before)
    info["dynamo_unique_graphs"] = dynamo_counts()["unique_graphs"] - dyn["unique_graphs"]
    info["start_up_s"] = round(time.perf_counter() - start, 2)
    cc = llm.llm_engine.config.compilation_config
    runner = llm.llm_engine.engine_core.model_runner
    info["compilation_level"] = cc.level
    info["capture_sizes"] = list(cc.cudagraph_capture_sizes)
    info["graph_runner"] = runner.graph_runner is not None
    info["num_kv_blocks"] = runner.num_blocks
    return llm, info


@torch.no_grad()
def _hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    out = hf_model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
    logprobs = torch.stack([lg[0].float().log_softmax(-1) for lg in out.logits]).cpu()
    return out.sequences[0, len(prompt):].tolist(), logprobs


def check_tiny(arch: str, tmp: str, new_tokens: int = 32) -> dict:
    """(a) + (b) for one architecture: both modes against transformers on the GPU."""
    path = os.path.join(tmp, f"tiny-{arch}")
    hf_model = write_tiny_checkpoint(path, arch).to(DEVICE)
    prompts = _prompts([3, 15, 17, 40, 100], 512, seed=0)
    refs = [_hf_greedy(hf_model, p, new_tokens) for p in prompts]
    del hf_model
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, logprobs=3)
    result = {}
    for mode, kwargs in (("compile_graphs", {}), ("enforce_eager", {"enforce_eager": True})):
        llm, info = _build(path, dtype="float32", max_num_seqs=8, max_num_batched_tokens=128, **kwargs)
        outs, serving, seconds = _serve(llm, prompts, params)
        same = [o.outputs[0].token_ids == r[0] for o, r in zip(outs, refs)]
        diff = max(abs(lp.logprob - ref[1][step, tok].item())
                   for o, ref in zip(outs, refs)
                   for step, entry in enumerate(o.outputs[0].logprobs) for tok, lp in entry.items())
        info.update(serving=serving, serve_s=round(seconds, 3), sequences_identical_to_hf=f"{sum(same)}/{len(same)}",
                    max_abs_logprob_diff_vs_hf=diff)
        result[mode] = info
        _free(llm)
    return result


def _write_small_llama(path: str) -> None:
    """A 4-layer Llama with Llama-3-8B's head geometry (head_dim 128, 4 query heads per KV head), bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    os.makedirs(path + "-config-only", exist_ok=True)
    config.save_pretrained(path + "-config-only")


def _compare(outs, ref_outs) -> dict:
    """Identical sequences, and for the others the first differing step (near-ties flip under other numerics)."""
    first_diff = []
    for o, r in zip(outs, ref_outs):
        a, b = o.outputs[0].token_ids, r.outputs[0].token_ids
        if a != b:
            first_diff.append(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y))
    return {"sequences_identical": f"{len(outs) - len(first_diff)}/{len(outs)}", "first_differing_steps": first_diff}


def check_llama_bf16(tmp: str, budget_left) -> dict:
    """(c): 16 mixed-length prompts, bf16, graphs vs eager."""
    path = os.path.join(tmp, "small-llama")
    _write_small_llama(path)
    prompts = _prompts([5, 9, 16, 17, 31, 33, 64, 100, 128, 200, 257, 300, 511, 600, 700, 1000], 32000, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    engine = dict(dtype="bfloat16", max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=1024)
    result, outputs = {}, {}
    for mode, kwargs in (("enforce_eager", {"enforce_eager": True}), ("compile_graphs", {}),
                         ("eager_forward_graphs", {"compile": False})):
        if mode == "eager_forward_graphs" and budget_left() < 30:
            result[mode] = "skipped: time budget"
            continue
        llm, info = _build(path, **engine, **kwargs)
        outputs[mode], info["serving"], seconds = _serve(llm, prompts, params)
        info["serve_s"] = round(seconds, 3)
        if mode != "enforce_eager":
            info.update(_compare(outputs[mode], outputs["enforce_eager"]))
        result[mode] = info
        _free(llm)
    if budget_left() > 20:
        from perf.dummy_model import dummy_llm

        start = time.perf_counter()
        llm = dummy_llm(path + "-config-only", dtype="bfloat16", max_model_len=2048, max_num_seqs=16, device=DEVICE)
        outs = llm.generate(prompt_token_ids=prompts[:4], sampling_params=SamplingParams(max_tokens=8),
                            use_tqdm=False)
        result["dummy_load_from_bare_config"] = {
            "ok": all(len(o.outputs[0].token_ids) == 8 for o in outs), "seconds": round(time.perf_counter() - start, 2)}
        _free(llm)
    return result


def _checks(record: dict) -> dict[str, bool]:
    checks = {}
    for arch, modes in record.get("tiny", {}).items():
        if not isinstance(modes, dict) or "compile_graphs" not in modes:
            checks[f"{arch}: ran"] = False
            continue
        for mode, info in modes.items():
            ok = info["sequences_identical_to_hf"].split("/")
            checks[f"{arch}/{mode}: tokens identical to transformers"] = ok[0] == ok[1]
        g = modes["compile_graphs"]
        checks[f"{arch}: one graph per bucket captured"] = g["num_cudagraphs_captured"] == len(g["capture_sizes"]) > 0
        checks[f"{arch}: one compiled forward"] = g["num_graphs_compiled"] == 1 and g["dynamo_unique_graphs"] == 1
        s = g["serving"]
        checks[f"{arch}: no recompile or capture while serving"] = (
            s["num_graphs_compiled"] == 0 and s["num_cudagraphs_captured"] == 0 and s["dynamo_unique_graphs"] == 0)
        checks[f"{arch}: decode steps replayed"] = s["num_cudagraph_replays"] > 0
    llama = record.get("llama_bf16", {})
    if isinstance(llama, dict) and isinstance(llama.get("compile_graphs"), dict):
        c = llama["compile_graphs"]
        checks["llama_bf16: graphs replayed"] = c["serving"]["num_cudagraph_replays"] > 0
        checks["llama_bf16: one compiled forward, none while serving"] = (
            c["num_graphs_compiled"] == 1 and c["dynamo_unique_graphs"] == 1
            and c["serving"]["num_graphs_compiled"] == 0)
        checks["llama_bf16: compile+graphs tokens identical to eager"] = not c["first_differing_steps"]
    else:
        checks["llama_bf16: ran"] = False
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["llama", "qwen3"])
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip optional phases past this time")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    logging.getLogger("graphserve").setLevel(logging.INFO)
    logging.getLogger("graphserve").addHandler(_Collect())
    budget_left = lambda: args.budget_s - (time.perf_counter() - START)  # noqa: E731
    from graphserve.entrypoints.env_info import collect_env

    record: dict = {"env": collect_env(), "tiny": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, arch in enumerate(args.archs):
            if i > 0 and budget_left() < 90:
                record["tiny"][arch] = "skipped: time budget"
                continue
            try:
                record["tiny"][arch] = check_tiny(arch, tmp)
            except Exception:  # record and go on: the other checks still tell something
                record["tiny"][arch] = {"error": traceback.format_exc()}
        try:
            record["llama_bf16"] = check_llama_bf16(tmp, budget_left)
        except Exception:
            record["llama_bf16"] = {"error": traceback.format_exc()}
    record["checks"] = _checks(record)
    record["log"] = LOG_LINES
    record["total_s"] = round(time.perf_counter() - START, 1)
    write_record("gpu_check_graphs", record, args.out)
    print("\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in record["checks"].items()))
    return 0 if all(record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
