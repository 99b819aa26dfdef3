"""H200 check of the Triton RMSNorm, RoPE, SiLU-and-mul and sampling kernels against the torch references.

1. Correctness at real shapes: rms_norm / fused_add_rms_norm (8k tokens x hidden 4096), silu_and_mul
   (intermediate 14336), rotary_embedding (Llama-3-8B q/k slices of qkv, NeoX, GPT-J, partial rotary) in bf16
   against the fp32 reference (||out - ref|| / ||ref|| < 1e-2); penalties (bit-identical) and filters (identical
   kept-token sets, fp32) on batch 256 x vocab 128256; the Sampler through the dispatcher (argmax rows).
2. Timings (CUDA events, median): GB/s of the elementwise kernels as a fraction of 4.25 TB/s, the sampling
   filters and penalties at batch 256 vs the torch path, search-width variants of the filter kernel.
Writes $OUT/elementwise_gpu_check.json after every section and prints a short table last. Without a GPU it runs
at tiny shapes in the Triton interpreter (a dry run of the script, no timings).

    PYTHONPATH=$PWD python3 perf/gpu_check_elementwise.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import graphserve.ops  # noqa: E402,F401
from graphserve.ops.activation import _silu_and_mul_ref  # noqa: E402
from graphserve.ops.layernorm import _fused_add_rms_norm_ref, _rms_norm_ref  # noqa: E402
from graphserve.ops.rotary import _rotary_embedding_ref  # noqa: E402
from graphserve.ops.sampling import _apply_penalties_ref, _apply_sampling_filters_ref  # noqa: E402
from graphserve.ops.triton import activation, layernorm, rotary, sampling  # noqa: E402

ROOFLINE_GBPS = 4250.0
# Launch variants of the filter kernel timed besides the default: (num_pivots, num_warps, accumulate_2d, block).
# The first run (perf/results/h200) also timed (32, 8, False, 1024) at 4.8 ms and (16, 16, False, 1024) at 7.3 ms.
VARIANTS = [(16, 8, False, 1024), (16, 8, True, 512), (8, 8, True, 1024), (4, 8, True, 1024)]
DEVICE = "cuda" if CUDA else "cpu"
RECORD: dict = {"checks": [], "timings": {}}
T0 = time.time()


def log(msg: str) -> None:
    """Print a line with the seconds since start."""
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save() -> None:
    """Write the record so far to $OUT (every section, so a crash keeps what ran)."""
    with open(os.path.join(os.environ.get("OUT", "."), "elementwise_gpu_check.json"), "w") as f:
        json.dump(RECORD, f, indent=1)


def gen(seed: int) -> torch.Generator:
    """A seeded generator on the device."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal samples on the device."""
    return (torch.randn(*shape, generator=gen(seed), device=DEVICE) * scale).to(dtype)


def record_check(name: str, out: torch.Tensor, ref: torch.Tensor, **info) -> None:
    """Record ||out - ref|| / ||ref|| against the bf16 bound 1e-2."""
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    RECORD["checks"].append({"name": name, "rel_err": err, "ok": err < 1e-2, **info})
    log(f"{name}: rel_err {err:.2e} {'ok' if err < 1e-2 else 'FAIL'}")


def check_norms(num_tokens: int, hidden: int) -> None:
    """rms_norm and fused_add_rms_norm in bf16 vs fp32, plus the dispatcher reaching the kernel."""
    x = randn(num_tokens, hidden, seed=0, scale=3.0, dtype=torch.bfloat16)
    w = randn(hidden, seed=1, dtype=torch.bfloat16)
    out, via_op = torch.empty_like(x), torch.empty_like(x)
    layernorm.rms_norm(out, x, w, 1e-5)
    ref = torch.empty(num_tokens, hidden, device=DEVICE)
    _rms_norm_ref(ref, x.float(), w.float(), 1e-5)
    torch.ops.graphserve.rms_norm(via_op, x, w, 1e-5)
    record_check("rms_norm bf16", out, ref, shape=[num_tokens, hidden], dispatch_same=torch.equal(out, via_op))
    r = randn(num_tokens, hidden, seed=2, scale=2.0, dtype=torch.bfloat16)
    x_ref, r_ref = x.float(), r.float()
    _fused_add_rms_norm_ref(x_ref, r_ref, w.float(), 1e-5)
    layernorm.fused_add_rms_norm(x, r, w, 1e-5)
    record_check("fused_add_rms_norm bf16 (x)", x, x_ref, shape=[num_tokens, hidden])
    record_check("fused_add_rms_norm bf16 (residual)", r, r_ref, shape=[num_tokens, hidden])


def check_silu(num_tokens: int, inter: int) -> None:
    """silu_and_mul in bf16 vs fp32."""
    x = randn(num_tokens, 2 * inter, seed=3, scale=2.0, dtype=torch.bfloat16)
    out = torch.empty(num_tokens, inter, dtype=torch.bfloat16, device=DEVICE)
    activation.silu_and_mul(out, x)
    ref = torch.empty(num_tokens, inter, device=DEVICE)
    _silu_and_mul_ref(ref, x.float())
    record_check("silu_and_mul bf16", out, ref, shape=[num_tokens, 2 * inter])


def cos_sin_cache(max_pos: int, rotary_dim: int) -> torch.Tensor:
    """[max_pos, rotary_dim] fp32 cache, cos then sin (Llama-3 base)."""
    inv = 500000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=DEVICE) / rotary_dim)
    ang = torch.arange(max_pos, dtype=torch.float64, device=DEVICE)[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), -1).float()


def rope_inputs(num_tokens: int, heads: tuple, rotary_dim: int, max_pos: int):
    """qkv, positions, split sizes and cache for one rotary case."""
    num_heads, num_kv_heads, head = heads
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head, seed=4, dtype=torch.bfloat16)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen(5), device=DEVICE)
    sizes = [num_heads * head, num_kv_heads * head, num_kv_heads * head]
    return qkv, positions, sizes, cos_sin_cache(max_pos, rotary_dim)


def check_rotary(num_tokens: int, heads: tuple) -> None:
    """rotary_embedding in bf16 vs fp32: NeoX, GPT-J and partial rotary, on q/k slices of qkv."""
    head = heads[2]
    for is_neox, rotary_dim in ((True, head), (False, head), (True, head // 2)):
        qkv, positions, sizes, cache = rope_inputs(num_tokens, heads, rotary_dim, 8192)
        ref = qkv.float()
        q_ref, k_ref, _ = ref.split(sizes, dim=-1)
        _rotary_embedding_ref(positions, q_ref, k_ref, head, cache, is_neox)
        q, k, _ = qkv.split(sizes, dim=-1)
        rotary.rotary_embedding(positions, q, k, head, cache, is_neox)
        record_check(f"rotary bf16 neox={is_neox} rot={rotary_dim}", qkv, ref, heads=list(heads))


def penalty_inputs(batch: int, vocab: int):
    """Logits, padded output / prompt ids (many repeats) and per-row penalties."""
    logits = randn(batch, vocab, seed=6, scale=3.0)
    out_len, prompt_len = min(256, vocab), min(1024, vocab)
    output_ids = torch.randint(0, min(2000, vocab), (batch, out_len), generator=gen(7), device=DEVICE)
    prompt_ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen(8), device=DEVICE)
    lengths = torch.randint(0, out_len + 1, (batch, 1), generator=gen(9), device=DEVICE)
    output_ids[torch.arange(out_len, device=DEVICE)[None, :] >= lengths] = vocab  # right padding
    params = [torch.rand(batch, generator=gen(10 + i), device=DEVICE) for i in range(3)]
    return logits, output_ids, prompt_ids, params[0], params[1] - 0.5, 0.8 + params[2]


def check_penalties(batch: int, vocab: int) -> None:
    """Penalties must be bit-identical to the torch reference (with and without prompt ids)."""
    logits, output_ids, prompt_ids, presence, frequency, repetition = penalty_inputs(batch, vocab)
    for prompt in (prompt_ids, None):
        out, ref = logits.clone(), logits.clone()
        sampling.apply_penalties(out, output_ids, prompt, presence, frequency, repetition)
        _apply_penalties_ref(ref, output_ids, prompt, presence, frequency, repetition)
        mismatches = int((out != ref).sum())
        RECORD["checks"].append({"name": f"penalties fp32 prompt={prompt is not None}", "mismatches": mismatches,
                                 "changed": int((out != logits).sum()), "ok": mismatches == 0})
        log(f"penalties prompt={prompt is not None}: {mismatches} mismatching logits")


def filter_params(batch: int, vocab: int):
    """Per-row filters drawn from realistic mixes; about one row in eight uses none of them."""
    g = torch.Generator().manual_seed(11)
    pick = lambda options: torch.tensor(options)[torch.randint(0, len(options), (batch,), generator=g)]  # noqa: E731
    top_k = pick([vocab, vocab, 1, 20, 50, 1000, min(40000, vocab)])
    top_p = pick([1.0, 1.0, 0.5, 0.9, 0.95, 0.99, 1e-6]).float()
    min_p = pick([0.0, 0.0, 0.0, 0.05, 0.1]).float()
    temperature = 0.5 + torch.rand(batch, generator=g)
    return [t.to(DEVICE) for t in (temperature, top_k, top_p, min_p)]


def compare_filters(name: str, logits: torch.Tensor, params: list) -> None:
    """Kept sets vs the fp32 torch reference; differing rows are also compared with an fp64 reference."""
    out, ref = torch.empty_like(logits), torch.empty_like(logits)
    sampling.apply_sampling_filters(out, logits, *params)
    _apply_sampling_filters_ref(ref, logits, *params)
    kept, kept_ref = out.isfinite(), ref.isfinite()
    bad = (kept != kept_ref).any(-1).nonzero().flatten().tolist()
    values_ok = torch.equal(out[kept & kept_ref], ref[kept & kept_ref])
    details = []
    for row in bad[:8]:
        row_params = [p[row:row + 1] for p in params]
        ref64 = torch.empty(1, logits.shape[1], dtype=torch.float64, device=DEVICE)
        _apply_sampling_filters_ref(ref64, logits[row:row + 1].double(), *row_params)
        details.append({"row": row, "top_k": int(params[1][row]), "top_p": float(params[2][row]),
                        "min_p": float(params[3][row]), "kernel_kept": int(kept[row].sum()),
                        "ref_kept": int(kept_ref[row].sum()), "fp64_kept": int(ref64.isfinite().sum()),
                        "kernel_equals_fp64": torch.equal(kept[row], ref64.isfinite()[0])})
    ok = values_ok and all(d["kernel_equals_fp64"] for d in details) and len(bad) <= 8
    RECORD["checks"].append({"name": name, "rows": logits.shape[0], "rows_identical": logits.shape[0] - len(bad),
                             "kept_values_identical": values_ok, "differing_rows": details, "ok": ok})
    log(f"{name}: {logits.shape[0] - len(bad)}/{logits.shape[0]} rows identical, values {values_ok}, {details}")


def check_filters(batch: int, vocab: int) -> None:
    """Filters on random fp32 logits and on bf16-valued logits (many ties)."""
    params = filter_params(batch, vocab)
    scales = 1.0 + 5.0 * torch.rand(batch, 1, generator=gen(12), device=DEVICE)
    logits = randn(batch, vocab, seed=13) * scales
    compare_filters("filters fp32 random logits", logits, params)
    compare_filters("filters fp32 bf16-valued logits (many ties)", logits.bfloat16().float(), params)


def check_sampler(batch: int, vocab: int) -> None:
    """Through Sampler and the dispatcher: rows whose filters leave only the argmax must sample it."""
    from graphserve.layers.sampler import Sampler, penalize_logits
    from graphserve.sampling_params import SamplingParams
    from graphserve.worker.sampling_metadata import SamplingRequestState, build_sampling_metadata

    kinds = [dict(top_k=1, temperature=1.3), dict(top_p=1e-7, temperature=0.8), dict(min_p=1.0, temperature=0.7)]
    states = [SamplingRequestState(f"r{i}", SamplingParams(presence_penalty=0.5, frequency_penalty=0.3,
                                                           repetition_penalty=1.2, **kinds[i % 3]),
                                   [i, 5, 9], [i % 7, 3, 3]) for i in range(batch)]
    meta = build_sampling_metadata(states, vocab, DEVICE)
    logits = randn(batch, vocab, seed=14, scale=3.0)
    sampled = Sampler()(logits, meta).sampled_token_ids
    expected = penalize_logits(logits.clone(), meta.output_token_ids, meta.prompt_token_ids,
                               meta.presence_penalties, meta.frequency_penalties, meta.repetition_penalties)
    same = int((sampled == expected.argmax(-1)).sum())
    RECORD["checks"].append({"name": "Sampler argmax rows via dispatcher", "rows": batch, "equal": same,
                             "ok": same == batch})
    log(f"Sampler via dispatcher: {same}/{batch} argmax rows")


def bench(fn) -> float:
    """Median milliseconds (CUDA events via triton's do_bench, L2 flushed between runs)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def time_op(name: str, fn, ref_fn, num_bytes: float) -> None:
    """Time a kernel and its torch reference; record GB/s and the roofline fraction."""
    ms, ref_ms = bench(fn), bench(ref_fn)
    gbps = num_bytes / ms / 1e6
    RECORD["timings"][name] = {"ms": ms, "GB/s": gbps, "roofline_fraction": gbps / ROOFLINE_GBPS,
                               "torch_ms": ref_ms, "speedup_vs_torch": ref_ms / ms}
    log(f"{name}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s ({gbps / ROOFLINE_GBPS:.0%}), torch {ref_ms * 1e3:.1f} us")


def run_elementwise_timings(num_tokens: int, hidden: int, inter: int, heads: tuple) -> None:
    """Bandwidth of the four elementwise kernels at real shapes."""
    x, w = randn(num_tokens, hidden, seed=0, dtype=torch.bfloat16), randn(hidden, seed=1, dtype=torch.bfloat16)
    out, r = torch.empty_like(x), randn(num_tokens, hidden, seed=2, dtype=torch.bfloat16)
    nbytes = x.numel() * 2
    time_op("rms_norm", lambda: layernorm.rms_norm(out, x, w, 1e-5), lambda: _rms_norm_ref(out, x, w, 1e-5),
            2 * nbytes)
    time_op("fused_add_rms_norm", lambda: layernorm.fused_add_rms_norm(x, r, w, 1e-5),
            lambda: _fused_add_rms_norm_ref(x, r, w, 1e-5), 4 * nbytes)
    xs = randn(num_tokens, 2 * inter, seed=3, dtype=torch.bfloat16)
    outs = torch.empty(num_tokens, inter, dtype=torch.bfloat16, device=DEVICE)
    time_op("silu_and_mul", lambda: activation.silu_and_mul(outs, xs), lambda: _silu_and_mul_ref(outs, xs),
            3 * outs.numel() * 2)
    qkv, positions, sizes, cache = rope_inputs(num_tokens, heads, heads[2], 8192)
    q, k, _ = qkv.split(sizes, dim=-1)
    time_op("rotary_embedding", lambda: rotary.rotary_embedding(positions, q, k, heads[2], cache, True),
            lambda: _rotary_embedding_ref(positions, q, k, heads[2], cache, True),
            2 * (q.numel() + k.numel()) * 2 + num_tokens * cache.shape[1] * 4)


def run_sampling_timings(batch: int, vocab: int) -> None:
    """Filter and penalty times at batch x vocab, vs the torch path, plus launch variants."""
    temperature, top_k, top_p, min_p = filter_params(batch, vocab)
    logits = randn(batch, vocab, seed=13, scale=3.0)
    out = torch.empty_like(logits)
    cases = {
        "filters all (top-k 50, top-p 0.9, min-p 0.05)": (torch.full_like(top_k, 50), torch.full_like(top_p, 0.9),
                                                          torch.full_like(min_p, 0.05)),
        "filters mixed rows": (top_k, top_p, min_p),
        "filters top-k 50 only": (torch.full_like(top_k, 50), None, None),
        "filters top-p 0.9 only": (None, torch.full_like(top_p, 0.9), None),
    }
    for name, (k, p, m) in cases.items():
        ms = bench(lambda: sampling.apply_sampling_filters(out, logits, temperature, k, p, m))
        ref_ms = bench(lambda: _apply_sampling_filters_ref(out, logits, temperature, k, p, m))
        RECORD["timings"][f"{name} @ {batch}x{vocab}"] = {"ms": ms, "torch_ms": ref_ms, "speedup_vs_torch": ref_ms / ms}
        log(f"{name}: {ms * 1e3:.0f} us (torch {ref_ms * 1e3:.0f} us)")
    k, p, m = cases["filters all (top-k 50, top-p 0.9, min-p 0.05)"]
    for pivots, warps, acc_2d, block in VARIANTS:
        ms = bench(lambda: sampling.apply_sampling_filters(out, logits, temperature, k, p, m, num_pivots=pivots,
                                                           num_warps=warps, accumulate_2d=acc_2d, block=block))
        name = f"filters all, pivots={pivots} warps={warps} acc_2d={acc_2d} block={block}"
        RECORD["timings"][name] = {"ms": ms}
        log(f"{name}: {ms * 1e3:.0f} us")
    logits_p, output_ids, prompt_ids, presence, frequency, repetition = penalty_inputs(batch, vocab)
    args = (output_ids, prompt_ids, presence, frequency, repetition)
    ms = bench(lambda: sampling.apply_penalties(logits_p, *args))
    ref_ms = bench(lambda: _apply_penalties_ref(logits_p, *args))
    RECORD["timings"][f"penalties @ {batch}x{vocab}, 256 output + 1024 prompt ids"] = {
        "ms": ms, "torch_ms": ref_ms, "speedup_vs_torch": ref_ms / ms}
    log(f"penalties: {ms * 1e3:.0f} us (torch {ref_ms * 1e3:.0f} us)")


def print_table() -> None:
    """The short table printed last."""
    print("\n| check | result |\n|---|---|")
    for c in RECORD["checks"]:
        detail = f"rel_err {c['rel_err']:.2e}" if "rel_err" in c else {k: v for k, v in c.items() if k in (
            "mismatches", "rows_identical", "equal")}
        print(f"| {c['name']} | {detail} {'ok' if c['ok'] else 'FAIL'} |")
    print("\n| timing | ms | GB/s | roofline | torch ms | speedup |\n|---|---|---|---|---|---|")
    for name, t in RECORD["timings"].items():
        gbps = f"{t['GB/s']:.0f}" if "GB/s" in t else ""
        frac = f"{t['roofline_fraction']:.0%}" if "roofline_fraction" in t else ""
        torch_ms = f"{t['torch_ms']:.3f}" if "torch_ms" in t else ""
        speedup = f"{t['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in t else ""
        print(f"| {name} | {t['ms']:.3f} | {gbps} | {frac} | {torch_ms} | {speedup} |")


def main() -> None:
    """Checks first, then timings (GPU only), saving after each section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CPU dry run uses them anyway)")
    quick = parser.parse_args().quick or not CUDA
    tokens, hidden, inter, heads = (16, 256, 512, (4, 2, 32)) if quick else (8192, 4096, 14336, (32, 8, 128))
    batch, vocab = (8, 3000) if quick else (256, 128256)
    from perf.common import git_sha

    RECORD.update(command=" ".join(["python3"] + sys.argv), date=time.strftime("%Y-%m-%d"), git_sha=git_sha())
    RECORD["shapes"] = {"tokens": tokens, "hidden": hidden, "intermediate": inter, "heads": heads,
                        "batch": batch, "vocab": vocab}
    if CUDA:
        import triton

        from graphserve.ops.triton import register_triton_kernels

        RECORD["device"] = torch.cuda.get_device_name()
        RECORD["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
        try:
            RECORD["registered"] = register_triton_kernels("CUDA")
        except Exception as e:  # another family's kernels failing must not hide these results
            log(f"register_triton_kernels failed ({e!r}); registering this script's kernels only")
            RECORD["registered"] = {}
            for module in (layernorm, activation, rotary, sampling):
                RECORD["registered"].update(module.register("CUDA"))
    steps = [lambda: check_norms(tokens, hidden), lambda: check_silu(tokens, inter),
             lambda: check_rotary(tokens, heads), lambda: check_penalties(batch, vocab),
             lambda: check_filters(batch, vocab), lambda: check_sampler(batch, vocab)]
    if CUDA:
        steps += [lambda: run_elementwise_timings(tokens, hidden, inter, heads),
                  lambda: run_sampling_timings(batch, vocab)]
    for step in steps:
        try:
            step()
        except Exception as e:  # one run on the GPU: record the failure and go on with the other sections
            log(f"step failed: {e!r}")
            RECORD["checks"].append({"name": "exception", "error": repr(e)[:2000], "ok": False})
        save()
    print_table()
    RECORD["all_ok"] = all(c["ok"] for c in RECORD["checks"])
    save()
    log(f"all checks ok: {RECORD['all_ok']}")


if __name__ == "__main__":
    main()
