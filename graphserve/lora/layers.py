"""LoRA-wrapped linear layers: the base projection plus, per token, the delta of the adapter in its slot.

Each wrapped layer owns stacked adapter weights for `max_loras` device slots (formats.md §5.3, packed slices side
by side): `lora_a` [max_loras, S * R, in] with slice s in rows s*R..s*R+r, and `lora_b` [max_loras, out, R] with the
slices' outputs stacked along `out` and the scaling folded in; a smaller rank is zero-padded and an empty slot is
all zeros. The per-token slot map and its sorted form are shared by every layer (a `LoRAMeta` of full-size
buffers, filled by the manager before each step and sliced to the step's tokens), so a step's forward — eager,
compiled or replayed from a CUDA graph — reads the adapters of that step with no recompile and no recapture:
only buffer contents change.
"""
from __future__ import annotations

import torch
from torch import nn

from graphserve.layers.linear import LinearBase
from graphserve.ops import lora as lora_ops
from graphserve.ops.lora import LoRAMeta


class LoRALinear(nn.Module):
    """`base_layer(x)` plus the LoRA delta of each token's slot (the base layer keeps its own weights and method)."""

    def __init__(self, base_layer: LinearBase, max_loras: int, max_rank: int, meta: LoRAMeta,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.max_rank = max_rank
        self.num_slices = len(base_layer.output_sizes)
        offsets = [0]
        for size in base_layer.output_sizes:
            offsets.append(offsets[-1] + size)
        self.slice_offsets = offsets
        self.meta = meta
        self.register_buffer("lora_a", torch.zeros(max_loras, self.num_slices * max_rank, base_layer.input_size,
                                                   dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, base_layer.output_size, max_rank, dtype=dtype,
                                                   device=device), persistent=False)

    def set_slot(self, slot: int, slices: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Write one adapter's (A [r, in], scaled B [out_s, r]) per slice into `slot`; None empties the slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for index, (a, b) in (slices or {}).items():
            rank = a.shape[0]
            start = index * self.max_rank
            self.lora_a[slot, start:start + rank].copy_(a, non_blocking=True)
            self.lora_b[slot, self.slice_offsets[index]:self.slice_offsets[index + 1], :rank].copy_(
                b, non_blocking=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, input_size]
        """[num_tokens, input_size] -> [num_tokens, output_size]."""
        y = self.base_layer(x)
        num_tokens = x.shape[0]
        meta = self.meta
        step_meta = LoRAMeta(meta.token_lora[:num_tokens], meta.sorted_token_ids[:num_tokens], meta.lora_ids,
                             meta.lora_token_start)
        buf = torch.empty(num_tokens, self.num_slices * self.max_rank, dtype=torch.float32, device=x.device)
        lora_ops.lora_shrink(buf, x, self.lora_a, step_meta)
        lora_ops.lora_expand(y, buf, self.lora_b, step_meta, self.slice_offsets)
        return y

    def extra_repr(self) -> str:
        return f"slices={self.num_slices}, max_rank={self.max_rank}, max_loras={self.lora_a.shape[0]}"
