"""Gated activations of MLPs."""
import torch
import torch.nn.functional as F

from graphserve.ops._register import register_op


def _silu_and_mul_ref(
    out: torch.Tensor,  # [..., intermediate_size]
    x: torch.Tensor,  # [..., 2 * intermediate_size]
) -> None:
    """out <- silu(x[..., :I]) * x[..., I:] (gate first, then up, as in a packed gate_up_proj)."""
    d = x.shape[-1] // 2
    # silu is rounded to the input dtype before the product, as HF's act_fn(gate) * up does.
    torch.mul(F.silu(x[..., :d]), x[..., d:], out=out)


register_op("silu_and_mul", _silu_and_mul_ref, mutates_args=("out",))


def silu_and_mul(
    out: torch.Tensor,  # [..., intermediate_size]
    x: torch.Tensor,  # [..., 2 * intermediate_size]
) -> None:
    """Write silu(gate) * up into `out`."""
    torch.ops.graphserve.silu_and_mul(out, x)
