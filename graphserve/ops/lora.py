"""Batched multi-LoRA ops: `lora_shrink` (x @ A^T into an fp32 buffer) and `lora_expand` (y += buffer @ B^T).

One LoRA-enabled linear layer serves every adapter of a step at once. The layer keeps L GPU slots per matrix, and
its output may be S packed "slices" (q/k/v of a fused qkv_proj: S = 3; gate/up: S = 2; S = 1 otherwise); R is the
engine's max LoRA rank:
- `lora_a` [L, S * R, H_in] in the model dtype: slot l's A matrices of the S slices stacked along dim 1 (slice s in
  rows s * R:(s + 1) * R); smaller ranks are zero-padded, an empty slot is all zeros;
- `lora_b` [L, N, R] in the model dtype: the slices' B matrices concatenated along the output dim N (slice s in rows
  slice_offsets[s]:slice_offsets[s + 1]), the adapter's scaling already folded in;
- `token_lora` [T] int32: the slot of each token row, -1 for none.

The Triton kernels group the rows by slot through sorted metadata computed on the host by
`fill_lora_token_metadata` (fixed sizes, so it lives in persistent graph-input buffers):
- `sorted_token_ids` [T] int32: a stable argsort of token_lora;
- `lora_ids` [L + 1] int32: the distinct values of token_lora in ascending order (-1 first if present), padded
  with -1;
- `lora_token_start` [L + 2] int32: where each lora_ids entry's rows start in sorted_token_ids ([0, ..., T]); the
  padding entries are empty segments starting at T.

Both ops write only their first argument, never sync with the host and allocate nothing that outlives the call
(graph-safe). The torch references below ignore the sorted metadata: they are the CPU implementation and the oracle
of the Triton kernels (one matmul per slot over every row, kept where the row's slot matches: no [T, S * R, H]
gather at prefill).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from graphserve.ops._register import register_op


class LoRAMeta(NamedTuple):
    """The per-step token -> slot mapping and its sorted form, on the device (see the module docstring)."""

    token_lora: torch.Tensor  # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # [T] int32
    lora_ids: torch.Tensor  # [L + 1] int32
    lora_token_start: torch.Tensor  # [L + 2] int32


def fill_lora_token_metadata(
    token_lora_cpu: torch.Tensor,  # [T] int, values in [-1, max_loras)
    max_loras: int,
    sorted_out: torch.Tensor,  # [>= T] int32
    ids_out: torch.Tensor,  # [>= max_loras + 1] int32
    start_out: torch.Tensor,  # [>= max_loras + 2] int32
) -> None:
    """Write the sorted metadata of `token_lora_cpu` into preallocated CPU tensors (entries of sorted_out past T are
    left as they are; ids_out is padded with -1 and start_out with T to their ends)."""
    t = token_lora_cpu.numel()
    if sorted_out.numel() < t or ids_out.numel() < max_loras + 1 or start_out.numel() < max_loras + 2:
        raise ValueError(f"LoRA metadata buffers too small for {t} tokens and {max_loras} slots")
    if t:
        low, high = int(token_lora_cpu.min()), int(token_lora_cpu.max())
        if low < -1 or high >= max_loras:
            raise ValueError(f"LoRA slots must lie in [-1, {max_loras}), got values from {low} to {high}")
    values, order = torch.sort(token_lora_cpu.reshape(-1), stable=True)
    ids, counts = torch.unique_consecutive(values, return_counts=True)
    n = ids.numel()
    sorted_out[:t] = order
    ids_out[:n] = ids
    ids_out[n:] = -1
    start_out[0] = 0
    start_out[1:n + 1] = torch.cumsum(counts, 0)
    start_out[n + 1:] = t


def lora_token_metadata(
    token_lora: torch.Tensor,  # [T] int CPU
    max_loras: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [T], [L + 1], [L + 2] int32 CPU
    """(sorted_token_ids, lora_ids, lora_token_start) of one step's token -> slot mapping."""
    sorted_ids = torch.empty(token_lora.numel(), dtype=torch.int32)
    ids = torch.empty(max_loras + 1, dtype=torch.int32)
    start = torch.empty(max_loras + 2, dtype=torch.int32)
    fill_lora_token_metadata(token_lora, max_loras, sorted_ids, ids, start)
    return sorted_ids, ids, start


def _lora_shrink_ref(
    buf: torch.Tensor,  # [T, S * R] float32
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [L, S * R, H_in]
    token_lora: torch.Tensor,  # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor,  # [T] int32 (unused here)
    lora_ids: torch.Tensor,  # [L + 1] int32 (unused here)
    lora_token_start: torch.Tensor,  # [L + 2] int32 (unused here)
) -> None:
    """buf[t] <- x[t] @ lora_a[token_lora[t]]^T in fp32, zeros for rows without an adapter."""
    xf = x.float()
    rows = token_lora.view(-1, 1)
    out = torch.zeros(buf.shape, dtype=torch.float32, device=buf.device)
    for slot in range(lora_a.shape[0]):
        out = torch.where(rows == slot, xf @ lora_a[slot].float().t(), out)
    buf.copy_(out)


def _lora_expand_ref(
    y: torch.Tensor,  # [T, N]
    buf: torch.Tensor,  # [T, S * R] float32
    lora_b: torch.Tensor,  # [L, N, R]
    token_lora: torch.Tensor,  # [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor,  # [T] int32 (unused here)
    lora_ids: torch.Tensor,  # [L + 1] int32 (unused here)
    lora_token_start: torch.Tensor,  # [L + 2] int32 (unused here)
    slice_offsets: list[int],  # [S + 1], 0 first, N last
) -> None:
    """y[t, cols of slice s] += buf[t, s * R:(s + 1) * R] @ lora_b[token_lora[t], cols]^T, summed in fp32 and added
    once; rows without an adapter are left unchanged."""
    rank = lora_b.shape[2]
    if len(slice_offsets) < 2 or slice_offsets[-1] != y.shape[1] or buf.shape[1] != (len(slice_offsets) - 1) * rank:
        raise ValueError(f"lora_expand: slice offsets {slice_offsets} do not fit y {tuple(y.shape)}, "
                         f"buf {tuple(buf.shape)} and rank {rank}")
    bf = buf.float()
    rows = token_lora.view(-1, 1)
    for s in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[s], slice_offsets[s + 1]
        part = y[:, lo:hi]
        delta = torch.zeros(part.shape, dtype=torch.float32, device=y.device)
        for slot in range(lora_b.shape[0]):
            delta = torch.where(rows == slot, bf[:, s * rank:(s + 1) * rank] @ lora_b[slot, lo:hi].float().t(), delta)
        part.copy_(torch.where(rows >= 0, (part.float() + delta).to(y.dtype), part))


register_op("lora_shrink", _lora_shrink_ref, mutates_args=("buf",))
register_op("lora_expand", _lora_expand_ref, mutates_args=("y",))


def lora_shrink(
    buf: torch.Tensor,  # [T, S * R] float32
    x: torch.Tensor,  # [T, H_in]
    lora_a: torch.Tensor,  # [L, S * R, H_in]
    meta: LoRAMeta,
) -> None:
    """buf <- each row's x @ A^T of its adapter (zeros without one)."""
    torch.ops.graphserve.lora_shrink(buf, x, lora_a, *meta)


def lora_expand(
    y: torch.Tensor,  # [T, N]
    buf: torch.Tensor,  # [T, S * R] float32
    lora_b: torch.Tensor,  # [L, N, R]
    meta: LoRAMeta,
    slice_offsets: list[int],  # [S + 1]
) -> None:
    """y += each row's buf @ B^T of its adapter, slice by slice (rows without one unchanged)."""
    torch.ops.graphserve.lora_expand(y, buf, lora_b, *meta, list(slice_offsets))
