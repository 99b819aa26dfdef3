"""silu_and_mul against float64 silu(gate) * up, plus opcheck."""
import pytest
import torch

from graphserve.ops.activation import silu_and_mul


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_silu_and_mul(dtype, tol):
    x = (torch.randn(3, 5, 2 * 24, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    out = torch.full((3, 5, 24), float("nan"), dtype=dtype)
    silu_and_mul(out, x)
    gate, up = x.double()[..., :24], x.double()[..., 24:]
    expected = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_opcheck():
    torch.library.opcheck(torch.ops.graphserve.silu_and_mul.default, (torch.empty(4, 8), torch.randn(4, 16)))
