"""The one helper that defines `torch.ops.graphserve.<name>` ops.

Like vLLM's `direct_register_custom_op` we define the schema on a module-level `Library` and register the
pure-torch reference directly on a dispatch key, instead of going through `torch.library.custom_op`, whose
Python wrapper adds overhead to every call. The reference goes on "CompositeExplicitAutograd" so it serves
every device (CPU, CUDA, ...) until a platform registers a kernel on its own key, which then takes
precedence: `get_op("paged_attention").impl("CUDA", triton_paged_attention)`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NAMESPACE = "graphserve"

# Ops live as long as this Library object: it must stay referenced for the whole process.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_OPS: dict[str, RegisteredOp] = {}


class RegisteredOp:
    """A defined op: its name, its reference implementation and a way to add per-device kernels."""

    def __init__(
        self, name: str, reference: Callable[..., object], schema: str, reference_graph_safe: bool = True,
    ) -> None:
        self.name = name
        self.reference = reference
        self.schema = schema
        # False when the reference syncs with the host (`.tolist()`, boolean masks): graph capture forbids that.
        self.reference_graph_safe = reference_graph_safe
        self.kernels: dict[str, Callable[..., object]] = {"CompositeExplicitAutograd": reference}

    @property
    def op(self) -> torch._ops.OpOverloadPacket:
        """The callable `torch.ops.graphserve.<name>`."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    def impl(self, dispatch_key: str, fn: Callable[..., object]) -> RegisteredOp:
        """Register `fn` as the kernel for one dispatch key (e.g. "CUDA"); it overrides the reference there."""
        if dispatch_key in self.kernels:
            raise RuntimeError(f"graphserve::{self.name} already has a kernel for {dispatch_key}")
        _LIB.impl(self.name, fn, dispatch_key)
        self.kernels[dispatch_key] = fn
        return self


def _fake_noop(*args: object, **kwargs: object) -> None:
    """Fake impl of an op that only writes into preallocated outputs: nothing to compute at trace time."""
    return None


def register_op(
    name: str,
    reference: Callable[..., object],
    mutates_args: Sequence[str],
    fake: Callable[..., object] | None = None,
    reference_graph_safe: bool = True,
) -> RegisteredOp:
    """Define `torch.ops.graphserve.<name>` with a schema inferred from `reference`'s type hints.

    `mutates_args` names every tensor argument the op writes (outputs are preallocated and passed in).
    `fake` may be omitted only for ops that return nothing. `reference_graph_safe=False` marks a reference that
    syncs with the host.
    """
    if name in _OPS:
        raise RuntimeError(f"graphserve::{name} is already registered")
    schema = torch.library.infer_schema(reference, mutates_args=tuple(mutates_args))
    if fake is None:
        if not schema.endswith("-> ()"):
            raise ValueError(f"graphserve::{name} returns tensors, so it needs an explicit fake impl")
        fake = _fake_noop
    _LIB.define(name + schema)
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    registered = RegisteredOp(name, reference, schema, reference_graph_safe)
    _OPS[name] = registered
    return registered


def get_op(name: str) -> RegisteredOp:
    """The registered op `name` (its module must have been imported), to add device kernels to it."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"graphserve::{name} is not registered; known: {sorted(_OPS)}") from None


def registered_ops() -> dict[str, RegisteredOp]:
    """Every op defined so far, by name (the platform reads which kernels each has)."""
    return dict(_OPS)
