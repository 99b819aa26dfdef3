"""GPU timings of the elementwise and sampling Triton kernels at Llama-3-8B shapes (timing only; their correctness
is tests/gpu/test_gpu_elementwise_ops.py, `python -m pytest -m gpu`).

1. GB/s of rms_norm, fused_add_rms_norm, silu_and_mul and rotary_embedding (8 192 tokens, hidden 4 096,
   intermediate 14 336, 32 / 8 heads of 128, bf16), as a fraction of the device's copy ceiling, next to the torch
   reference on the same tensors;
2. the sampling filters (temperature + top-k / top-p / min-p) and penalties at batch 256 x vocab 128 256 vs the
   torch path, and launch variants of the filter kernel.
Median of CUDA-event timings after warm-up (`triton.testing.do_bench`, L2 flushed between runs); random inputs.

    python -m perf.bench_elementwise_ops --out $OUT/elementwise_ops.json [--quick]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from perf.common import write_record

# Launch variants of the filter kernel timed besides the default: (num_pivots, num_warps, accumulate_2d, block).
# The first H200 run also timed (32, 8, False, 1024) at 4.8 ms and (16, 16, False, 1024) at 7.3 ms.
FILTER_VARIANTS = [(16, 8, False, 1024), (16, 8, True, 512), (8, 8, True, 1024), (4, 8, True, 1024)]
EPS = 1e-5


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def _median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` (triton's do_bench: CUDA events, L2 flushed between runs)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _row(ms: float, ref_ms: float, num_bytes: float | None, ceiling_bytes_per_s: float | None) -> dict:
    """One timing: milliseconds, GB/s and its fraction of the ceiling when bytes are known, the torch time."""
    row = {"ms": round(ms, 5), "torch_ms": round(ref_ms, 5), "speedup_vs_torch": round(ref_ms / ms, 2)}
    if num_bytes is not None:
        gbps = num_bytes / ms / 1e6
        row["GB_per_s"] = round(gbps, 1)
        if ceiling_bytes_per_s:
            row["roofline_fraction"] = round(gbps * 1e9 / ceiling_bytes_per_s, 4)
    return row


def _cos_sin_cache(max_position: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 500000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cuda") / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64, device="cuda")[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), -1).float()


def time_elementwise(num_tokens: int, hidden: int, inter: int, heads: tuple, ceiling: float | None) -> dict:
    """Kernel vs torch reference for the four elementwise ops; bytes are what each op must read and write."""
    from graphserve.ops.activation import _silu_and_mul_ref
    from graphserve.ops.layernorm import _fused_add_rms_norm_ref, _rms_norm_ref
    from graphserve.ops.rotary import _rotary_embedding_ref
    from graphserve.ops.triton import activation, layernorm, rotary

    x, w = _randn(num_tokens, hidden, seed=0, dtype=torch.bfloat16), _randn(hidden, seed=1, dtype=torch.bfloat16)
    out, residual = torch.empty_like(x), _randn(num_tokens, hidden, seed=2, dtype=torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    rows = {
        "rms_norm": _row(_median_ms(lambda: layernorm.rms_norm(out, x, w, EPS)),
                         _median_ms(lambda: _rms_norm_ref(out, x, w, EPS)), 2 * nbytes, ceiling),
        "fused_add_rms_norm": _row(_median_ms(lambda: layernorm.fused_add_rms_norm(x, residual, w, EPS)),
                                   _median_ms(lambda: _fused_add_rms_norm_ref(x, residual, w, EPS)), 4 * nbytes,
                                   ceiling),
    }
    gate_up = _randn(num_tokens, 2 * inter, seed=3, dtype=torch.bfloat16)
    act = torch.empty(num_tokens, inter, dtype=torch.bfloat16, device="cuda")
    rows["silu_and_mul"] = _row(_median_ms(lambda: activation.silu_and_mul(act, gate_up)),
                                _median_ms(lambda: _silu_and_mul_ref(act, gate_up)), 3 * act.numel() * 2, ceiling)
    num_heads, num_kv_heads, head_dim = heads
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, seed=4, dtype=torch.bfloat16)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    cache = _cos_sin_cache(8192, head_dim)
    rope_bytes = 2 * (q.numel() + k.numel()) * 2 + num_tokens * cache.shape[1] * 4
    rows["rotary_embedding"] = _row(
        _median_ms(lambda: rotary.rotary_embedding(positions, q, k, head_dim, cache, True)),
        _median_ms(lambda: _rotary_embedding_ref(positions, q, k, head_dim, cache, True)), rope_bytes, ceiling)
    return rows


def _filter_params(batch: int, vocab: int) -> list[torch.Tensor]:
    """Per-row temperature, top-k, top-p and min-p drawn from realistic mixes."""
    g = torch.Generator().manual_seed(11)

    def pick(options: list) -> torch.Tensor:
        return torch.tensor(options)[torch.randint(0, len(options), (batch,), generator=g)]

    top_k = pick([vocab, vocab, 1, 20, 50, 1000, min(40000, vocab)])
    top_p = pick([1.0, 1.0, 0.5, 0.9, 0.95, 0.99, 1e-6]).float()
    min_p = pick([0.0, 0.0, 0.0, 0.05, 0.1]).float()
    temperature = 0.5 + torch.rand(batch, generator=g)
    return [t.cuda() for t in (temperature, top_k, top_p, min_p)]


def time_sampling(batch: int, vocab: int) -> dict:
    """Filters (four mixes and launch variants) and penalties vs the torch path at batch x vocab."""
    from graphserve.ops.sampling import (
        _apply_penalties_ref,
        _apply_sampling_filters_ref,
    )
    from graphserve.ops.triton import sampling

    temperature, top_k, top_p, min_p = _filter_params(batch, vocab)
    logits = _randn(batch, vocab, seed=13, scale=3.0)
    out = torch.empty_like(logits)
    everything = (torch.full_like(top_k, 50), torch.full_like(top_p, 0.9), torch.full_like(min_p, 0.05))
    cases = {
        "filters all (top-k 50, top-p 0.9, min-p 0.05)": everything,
        "filters mixed rows": (top_k, top_p, min_p),
        "filters top-k 50 only": (everything[0], None, None),
        "filters top-p 0.9 only": (None, everything[1], None),
    }
    rows = {}
    for name, (k, p, m) in cases.items():
        rows[f"{name} @ {batch}x{vocab}"] = _row(
            _median_ms(lambda k=k, p=p, m=m: sampling.apply_sampling_filters(out, logits, temperature, k, p, m)),
            _median_ms(lambda k=k, p=p, m=m: _apply_sampling_filters_ref(out, logits, temperature, k, p, m)),
            None, None)
    for pivots, warps, acc_2d, block in FILTER_VARIANTS:
        ms = _median_ms(lambda pivots=pivots, warps=warps, acc_2d=acc_2d, block=block: sampling.apply_sampling_filters(
            out, logits, temperature, *everything, num_pivots=pivots, num_warps=warps, accumulate_2d=acc_2d,
            block=block))
        rows[f"filters all, pivots={pivots} warps={warps} acc_2d={acc_2d} block={block}"] = {"ms": round(ms, 5)}
    g = torch.Generator(device="cuda").manual_seed(7)
    output_ids = torch.randint(0, min(2000, vocab), (batch, 256), generator=g, device="cuda")
    prompt_ids = torch.randint(0, vocab, (batch, 1024), generator=g, device="cuda")
    penalties = [torch.rand(batch, generator=g, device="cuda") for _ in range(3)]
    args = (output_ids, prompt_ids, penalties[0], penalties[1] - 0.5, 0.8 + penalties[2])
    rows[f"penalties @ {batch}x{vocab}, 256 output + 1024 prompt ids"] = _row(
        _median_ms(lambda: sampling.apply_penalties(logits, *args)),
        _median_ms(lambda: _apply_penalties_ref(logits, *args)), None, None)
    return rows


def print_table(results: dict) -> None:
    """The short table printed last."""
    print("\n| timing | ms | GB/s | roofline | torch ms | speedup |\n|---|---|---|---|---|---|")
    for section in ("elementwise", "sampling"):
        for name, t in results[section].items():
            frac = t.get("roofline_fraction")
            print(f"| {name} | {t['ms']:.4f} | {t.get('GB_per_s', '')} | {'' if frac is None else f'{frac:.0%}'} "
                  f"| {t.get('torch_ms', '')} | {t.get('speedup_vs_torch', '')} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run of the script)")
    parser.add_argument("--out", default=None, help="write the JSON record to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_elementwise_ops times GPU kernels; no GPU is visible")
    from graphserve.benchmarks.attention_kernels import copy_bandwidth, cuda_ceilings
    from graphserve.ops.triton import register_triton_kernels

    register_triton_kernels("CUDA")
    tokens, hidden, inter, heads = (1024, 1024, 2048, (8, 2, 128)) if args.quick else (8192, 4096, 14336, (32, 8, 128))
    batch, vocab = (32, 32000) if args.quick else (256, 128256)
    ceilings = cuda_ceilings()
    measured_copy = copy_bandwidth()
    # Fractions against the device's measured ceiling when it is known, else against this run's copy bandwidth.
    ceiling = ceilings.bytes_per_s if ceilings else measured_copy
    results = {
        "shapes": {"tokens": tokens, "hidden": hidden, "intermediate": inter, "heads": list(heads), "batch": batch,
                   "vocab": vocab, "dtype": "bfloat16 (elementwise), float32 (sampling)"},
        "ceilings": ceilings.to_dict() if ceilings else None,
        "copy_bandwidth_GBps": round(measured_copy / 1e9, 1),
        "elementwise": time_elementwise(tokens, hidden, inter, heads, ceiling),
        "sampling": time_sampling(batch, vocab),
    }
    write_record("elementwise_ops", results, args.out)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
