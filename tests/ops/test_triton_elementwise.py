"""Triton rms_norm / fused_add_rms_norm / rotary_embedding / silu_and_mul vs the torch references (interpreter).

The kernels are called directly with CPU tensors (TRITON_INTERPRET=1 from conftest.py); the torch references
are what `torch.ops.graphserve.*` runs on the CPU. fp32 and fp16 only: the interpreter's bf16 rounding is wrong.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from graphserve.ops.triton import activation, layernorm, rotary  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}
DTYPES = [torch.float32, torch.float16]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    x = _randn(3, 5, 96, dtype=dtype, scale=3.0)  # 3-D, hidden not a power of two
    weight = _randn(96, dtype=dtype, seed=1)
    out, ref = torch.full_like(x, float("nan")), torch.empty_like(x)
    layernorm.rms_norm(out, x, weight, 1e-5)
    torch.ops.graphserve.rms_norm(ref, x, weight, 1e-5)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_rms_norm_strided_rows_and_fp32_weight():
    """A column slice of a wider buffer in and out; an fp32 weight promotes the product like the reference."""
    src = _randn(6, 80, dtype=torch.float16, scale=2.0)
    x = src[:, 8:72]
    weight = _randn(64, seed=2)
    dst = torch.zeros(6, 100, dtype=torch.float32)
    out = dst[:, 20:84]
    layernorm.rms_norm(out, x, weight, 1e-6)
    ref = torch.empty(6, 64)
    torch.ops.graphserve.rms_norm(ref, x, weight, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(dst[:, :20]) == 0 and torch.count_nonzero(dst[:, 84:]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_in_place(dtype):
    x, residual = _randn(7, 48, dtype=dtype, seed=3), _randn(7, 48, dtype=dtype, seed=4, scale=4.0)
    weight = _randn(48, dtype=dtype, seed=5)
    x_ref, residual_ref = x.clone(), residual.clone()
    layernorm.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.ops.graphserve.fused_add_rms_norm(x_ref, residual_ref, weight, 1e-6)
    torch.testing.assert_close(residual, residual_ref, rtol=0, atol=0)  # the rounded sum, bit for bit
    torch.testing.assert_close(x, x_ref, **TOL[dtype])


def test_fused_add_rms_norm_strided_and_non_collapsible():
    """Strided row views are written in place; a transposed layout goes through copies and is still updated."""
    buf_x, buf_r = _randn(5, 64, seed=6), _randn(5, 64, seed=7)
    weight = _randn(32, seed=8)
    x, residual = buf_x[:, 16:48], buf_r[:, 32:]
    x_ref, residual_ref = x.clone(), residual.clone()
    layernorm.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.ops.graphserve.fused_add_rms_norm(x_ref, residual_ref, weight, 1e-6)
    torch.testing.assert_close(buf_x[:, 16:48], x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf_r[:, 32:], residual_ref, rtol=0, atol=0)
    x_t = _randn(4, 3, 32, seed=9).transpose(0, 1)  # [3, 4, 32], rows cannot collapse to one stride
    r_t = _randn(3, 4, 32, seed=10)
    x_t_ref, r_t_ref = x_t.clone(), r_t.clone()
    layernorm.fused_add_rms_norm(x_t, r_t, weight, 1e-6)
    torch.ops.graphserve.fused_add_rms_norm(x_t_ref, r_t_ref, weight, 1e-6)
    torch.testing.assert_close(x_t, x_t_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_t, r_t_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    x = _randn(2, 3, 2 * 1100, dtype=dtype, scale=3.0)  # two column blocks, the second partial
    out, ref = torch.empty(2, 3, 1100, dtype=dtype), torch.empty(2, 3, 1100, dtype=dtype)
    activation.silu_and_mul(out, x)
    torch.ops.graphserve.silu_and_mul(ref, x)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_silu_and_mul_strided_input():
    buf = _randn(4, 2 * 40 + 16, scale=2.0)
    x = buf[:, 16:]
    out, ref = torch.empty(4, 40), torch.empty(4, 40)
    activation.silu_and_mul(out, x)
    torch.ops.graphserve.silu_and_mul(ref, x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def _cos_sin_cache(max_pos: int, rotary_dim: int, dtype=torch.float32) -> torch.Tensor:
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype,head_size,rotary_dim", [
    (torch.float32, 32, 32), (torch.float32, 32, 16), (torch.float16, 16, 8), (torch.float16, 24, 24),
])
def test_rotary_embedding_on_qkv_slices(is_neox, dtype, head_size, rotary_dim):
    """GQA (4 query heads, 2 KV heads), q and k as strided slices of one qkv buffer; v and the non-rotary
    dims stay untouched."""
    num_heads, num_kv_heads, num_tokens = 4, 2, 5
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=11)
    positions = torch.tensor([0, 5, 17, 3, 31])
    cache = _cos_sin_cache(32, rotary_dim)
    expected = qkv.clone()
    q_ref, k_ref, _ = expected.split([q_size, kv_size, kv_size], dim=-1)
    torch.ops.graphserve.rotary_embedding(positions, q_ref, k_ref, head_size, cache, is_neox)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    rotary.rotary_embedding(positions, q, k, head_size, cache, is_neox)
    torch.testing.assert_close(qkv, expected, **TOL[dtype])
    untouched = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=11)
    torch.testing.assert_close(qkv[:, q_size + kv_size:], untouched[:, q_size + kv_size:], rtol=0, atol=0)
    heads = qkv[:, :q_size].view(num_tokens, num_heads, head_size)
    original = untouched[:, :q_size].view(num_tokens, num_heads, head_size)
    torch.testing.assert_close(heads[..., rotary_dim:], original[..., rotary_dim:], rtol=0, atol=0)
    assert not torch.equal(heads[1:, :, :rotary_dim], original[1:, :, :rotary_dim])


def test_rotary_embedding_half_precision_cache_and_int32_positions():
    q, k = _randn(3, 2 * 16, seed=12), _randn(3, 16, seed=13)
    cache = _cos_sin_cache(8, 16, torch.float16)
    positions = torch.tensor([7, 0, 4], dtype=torch.int32)
    q_ref, k_ref = q.clone(), k.clone()
    torch.ops.graphserve.rotary_embedding(positions.long(), q_ref, k_ref, 16, cache, True)
    rotary.rotary_embedding(positions, q, k, 16, cache, True)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


def test_register_triton_kernels_attaches_these_kernels_once():
    """register_triton_kernels puts every wrapper of this family (and the sampling ones) on the CUDA key, once.

    Runs in a fresh interpreter so this process's dispatcher keeps no CUDA kernels other tests could see.
    """
    code = (
        "import graphserve.ops\n"
        "from graphserve.ops._register import get_op\n"
        "from graphserve.ops.triton import activation, layernorm, register_triton_kernels, rotary, sampling\n"
        "expected = {'rms_norm': layernorm.rms_norm, 'fused_add_rms_norm': layernorm.fused_add_rms_norm,\n"
        "            'silu_and_mul': activation.silu_and_mul, 'rotary_embedding': rotary.rotary_embedding,\n"
        "            'apply_penalties': sampling.apply_penalties,\n"
        "            'apply_sampling_filters': sampling.apply_sampling_filters}\n"
        "assert all(set(get_op(n).kernels) == {'CompositeExplicitAutograd'} for n in expected)\n"
        "registered = register_triton_kernels('CUDA')\n"
        "assert all(registered[n] == 'triton' for n in expected), registered\n"
        "assert all(get_op(n).kernels['CUDA'] is fn for n, fn in expected.items())\n"
        "assert register_triton_kernels('CUDA') == registered\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"})
