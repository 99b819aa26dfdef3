"""rotary_embedding against an explicit per-pair rotation, incl. partial rotary, GPT-J style, strided q/k."""
import math

import pytest
import torch

from graphserve.ops.rotary import rotary_embedding


def _cache(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv = [base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
    ang = torch.tensor([[p * f for f in inv] for p in range(max_pos)], dtype=torch.float64)
    return torch.cat((ang.cos(), ang.sin()), -1).float()


def _expected(x: torch.Tensor, positions, head_size: int, rotary_dim: int, is_neox: bool, base=10000.0):
    """Rotate each (i, j) pair of each head by angle pos * base^(-2k/d), one pair at a time."""
    out = x.double().clone().view(x.shape[0], -1, head_size)
    half = rotary_dim // 2
    for t, pos in enumerate(positions.tolist()):
        for k in range(half):
            i, j = (k, k + half) if is_neox else (2 * k, 2 * k + 1)
            theta = pos * base ** (-2 * k / rotary_dim)
            a, b = out[t, :, i].clone(), out[t, :, j].clone()
            out[t, :, i] = a * math.cos(theta) - b * math.sin(theta)
            out[t, :, j] = b * math.cos(theta) + a * math.sin(theta)
    return out.view(x.shape)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(16, 16), (16, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rotary_embedding(is_neox, head_size, rotary_dim, dtype, tol):
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 3, 30])
    query = torch.randn(5, 4 * head_size, generator=g).to(dtype)
    key = torch.randn(5, 2 * head_size, generator=g).to(dtype)
    exp_q = _expected(query, positions, head_size, rotary_dim, is_neox)
    exp_k = _expected(key, positions, head_size, rotary_dim, is_neox)
    rotary_embedding(positions, query, key, head_size, _cache(32, rotary_dim), is_neox)
    torch.testing.assert_close(query.double(), exp_q, rtol=tol, atol=tol)
    torch.testing.assert_close(key.double(), exp_k, rtol=tol, atol=tol)


def test_writes_through_strided_slices_of_qkv():
    head_size = 8
    qkv = torch.randn(6, (4 + 2 + 2) * head_size)
    original = qkv.clone()
    q, k, _ = qkv.split([4 * head_size, 2 * head_size, 2 * head_size], dim=-1)
    positions = torch.arange(6)
    exp_q = _expected(q, positions, head_size, head_size, True)
    rotary_embedding(positions, q, k, head_size, _cache(8, head_size), True)
    torch.testing.assert_close(qkv[:, : 4 * head_size].double(), exp_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, 6 * head_size :], original[:, 6 * head_size :], rtol=0, atol=0)
    assert not torch.equal(qkv[:, 4 * head_size : 6 * head_size], original[:, 4 * head_size : 6 * head_size])


def test_opcheck():
    args = (torch.tensor([0, 2, 1]), torch.randn(3, 32), torch.randn(3, 16), 8, _cache(4, 8), True)
    torch.library.opcheck(torch.ops.graphserve.rotary_embedding.default, args)
