"""The op registration helper: schema inference, per-dispatch-key override, fake impls, errors."""
import pytest
import torch

import graphserve.ops  # noqa: F401  (registers every family)
from graphserve.ops._register import get_op, register_op


def _scale_ref(out: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    out.copy_(x * alpha)


def _scale_cpu_override(out: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    out.copy_(x * alpha + 1000.0)


_SCALE = register_op("test_only_scale", _scale_ref, mutates_args=("out",))


def test_schema_marks_mutated_output_and_scalars():
    assert _SCALE.schema == "(Tensor(a0!) out, Tensor x, float alpha) -> ()"
    assert get_op("paged_attention").schema.startswith("(Tensor(a0!) out, Tensor query")
    assert "Tensor(a0!) x, Tensor(a1!) residual" in get_op("fused_add_rms_norm").schema


def test_reference_runs_then_device_kernel_overrides_it():
    x = torch.arange(4.0)
    out = torch.empty(4)
    torch.ops.graphserve.test_only_scale(out, x, 2.0)
    torch.testing.assert_close(out, x * 2)
    _SCALE.impl("CPU", _scale_cpu_override)
    torch.ops.graphserve.test_only_scale(out, x, 2.0)
    torch.testing.assert_close(out, x * 2 + 1000.0)
    with pytest.raises(RuntimeError, match="already has a kernel"):
        _SCALE.impl("CPU", _scale_ref)


def test_meta_tensors_use_the_fake_impl():
    out = torch.empty(3, device="meta")
    torch.ops.graphserve.rms_norm(out, torch.empty(3, device="meta"), torch.empty(3, device="meta"), 1e-6)
    assert out.device.type == "meta"


def test_registration_errors():
    with pytest.raises(RuntimeError, match="already registered"):
        register_op("rms_norm", _scale_ref, mutates_args=("out",))

    def returns_tensor(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    with pytest.raises(ValueError, match="explicit fake"):
        register_op("test_only_returns_tensor", returns_tensor, mutates_args=())
    with pytest.raises(KeyError, match="not registered"):
        get_op("no_such_op")
