"""rms_norm / fused_add_rms_norm against a float64 implementation, plus opcheck."""
import pytest
import torch

from graphserve.ops.layernorm import fused_add_rms_norm, rms_norm

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 2e-2)}


def _expected(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 64, generator=g) * 3).to(dtype)
    weight = torch.randn(64, generator=g).to(dtype)
    out = torch.full_like(x, float("nan"))
    rms_norm(out, x, weight, 1e-5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), _expected(x, weight, 1e-5), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_updates_both_in_place(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g).to(dtype)
    residual = torch.randn(2, 5, 32, generator=g).to(dtype)
    weight = torch.randn(32, generator=g).to(dtype)
    new_residual = x + residual  # rounded to dtype, as HF's residual add is
    fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, new_residual, rtol=0, atol=0)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(x.double(), _expected(new_residual, weight, 1e-6), rtol=rtol, atol=atol)


def test_opcheck():
    x, w = torch.randn(4, 16), torch.randn(16)
    torch.library.opcheck(torch.ops.graphserve.rms_norm.default, (torch.empty(4, 16), x, w, 1e-6))
    torch.library.opcheck(torch.ops.graphserve.fused_add_rms_norm.default, (x.clone(), torch.randn(4, 16), w, 1e-6))
