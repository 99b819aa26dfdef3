"""RMSNorm ops with HF semantics: normalize in fp32, cast back to the input dtype, then multiply by the weight."""
import torch

from graphserve.ops._register import register_op


def _rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm math, so greedy outputs match transformers bit for bit in fp32."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rms_norm_ref(
    out: torch.Tensor,  # [..., hidden_size]
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """out <- rmsnorm(x) * weight."""
    out.copy_(_rms_normalize(x, weight, eps))


def _fused_add_rms_norm_ref(
    x: torch.Tensor,  # [..., hidden_size]
    residual: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """In place: residual <- x + residual, then x <- rmsnorm(residual) * weight."""
    # HF adds the residual in the model dtype before normalizing, so round the sum first as it does.
    residual.add_(x)
    x.copy_(_rms_normalize(residual, weight, eps))


register_op("rms_norm", _rms_norm_ref, mutates_args=("out",))
register_op("fused_add_rms_norm", _fused_add_rms_norm_ref, mutates_args=("x", "residual"))


def rms_norm(
    out: torch.Tensor,  # [..., hidden_size]
    x: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """Write rmsnorm(x) * weight into `out`."""
    torch.ops.graphserve.rms_norm(out, x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden_size]
    residual: torch.Tensor,  # [..., hidden_size]
    weight: torch.Tensor,  # [hidden_size]
    eps: float,
) -> None:
    """In place: residual <- x + residual; x <- rmsnorm(residual) * weight."""
    torch.ops.graphserve.fused_add_rms_norm(x, residual, weight, eps)
