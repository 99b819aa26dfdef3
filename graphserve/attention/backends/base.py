"""The attention backend interface (vLLM V1's split): a backend class, a metadata builder, an impl.

- `AttentionBackend` says what it supports, the shape of one layer's KV cache, and whether its decode steps can
  be replayed from CUDA/HIP graphs; the platform picks one by name (`registry.py`).
- `AttentionMetadataBuilder` turns the step's `AttentionInputs` (host-side, built once by the runner's
  `InputBatch`) into the device metadata its impl reads. It owns persistent device buffers, so that graphs
  captured over them (`build_for_capture`) replay any later batch written into them (`prepare_for_replay`).
- `AttentionImpl` runs one layer: write this step's K/V into the cache, attend over it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:
    from graphserve.platforms.kernels import KernelChoice

PAD_SLOT_ID = -1


@dataclass
class AttentionInputs:
    """Host-side (numpy) layout of one step's batch, in scheduling order; every backend builds from it."""

    query_start_loc: np.ndarray  # [num_reqs + 1] int32, cu_seqlens_q
    seq_lens: np.ndarray  # [num_reqs] int32, context length including this step's tokens
    block_table: np.ndarray  # [num_reqs, width] int32, each row's block ids (padded with 0)
    slot_mapping: np.ndarray  # [num_tokens] int64, cache slot of each new token

    @property
    def num_reqs(self) -> int:
        """Sequences in the batch."""
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        """New tokens in the batch (the flat token dimension)."""
        return self.slot_mapping.shape[0]


@dataclass
class AttentionMetadata:
    """Device-side batch layout shared by every attention layer of one forward (read through the forward context)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write (padding)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cu_seqlens_q
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_table: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int  # tokens before graph padding; equals query_start_loc[-1]

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return self.seq_lens.shape[0]


class AttentionMetadataBuilder(ABC):
    """Builds a backend's per-step metadata from `AttentionInputs`, into buffers it owns."""

    def __init__(
        self,
        block_size: int,
        max_num_reqs: int,
        max_num_tokens: int,
        max_model_len: int,
        device: torch.device,
        pin_memory: bool,
    ) -> None:
        self.block_size = block_size
        self.max_num_reqs = max_num_reqs
        self.max_num_tokens = max_num_tokens
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.device = device
        self.pin_memory = pin_memory

    @abstractmethod
    def build(self, inputs: AttentionInputs) -> AttentionMetadata:
        """This step's metadata, on the device (eager or compiled forward)."""

    def build_for_capture(self, num_reqs: int, query_len: int = 1) -> AttentionMetadata:
        """Metadata of a graph of `num_reqs` requests with `query_len` query tokens each (1: a decode graph, more: a
        verify graph): views of the persistent buffers, static bounds."""
        raise NotImplementedError(f"{type(self).__name__} cannot be captured in CUDA/HIP graphs")

    def prepare_for_replay(self, inputs: AttentionInputs, num_padded_reqs: int, query_len: int = 1) -> None:
        """Write a batch of exactly `query_len` tokens per request into the buffers `build_for_capture` handed out,
        padded to `num_padded_reqs` requests."""
        raise NotImplementedError(f"{type(self).__name__} cannot be captured in CUDA/HIP graphs")


class AttentionImpl(ABC):
    """Runs one layer's attention for a batch described by its backend's metadata."""

    # Whether the backend applies attention-logit soft-capping (Gemma 2) and ALiBi biases (Bloom, Falcon-RW);
    # others refuse layers that need them.
    supports_logits_soft_cap = False
    supports_alibi = False

    def __init__(
        self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, sliding_window: int | None = None,
        logits_soft_cap: float | None = None, use_alibi: bool = False,
    ) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if logits_soft_cap and not self.supports_logits_soft_cap:
            raise ValueError(f"{type(self).__name__} cannot soft-cap attention logits (the model sets "
                             f"attn_logit_softcapping={logits_soft_cap}); use the PAGED_ATTN backend")
        if use_alibi and not self.supports_alibi:
            raise ValueError(f"{type(self).__name__} cannot add ALiBi biases; use the PAGED_ATTN backend")
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor | None,  # this layer's cache, in the backend's get_kv_cache_shape
        attn_metadata: AttentionMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
        k_scale: torch.Tensor | None = None,  # [1] fp32: an FP8 cache's scales
        v_scale: torch.Tensor | None = None,
        alibi_slopes: torch.Tensor | None = None,  # [num_heads] fp32 (backends with supports_alibi)
    ) -> None:
        """Write attention output into `output`; without metadata, plain causal attention over the tokens."""


class AttentionBackend(ABC):
    """Static description of an attention implementation, selected by name (`registry.py`)."""

    name: ClassVar[str]
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None  # None = any
    supports_cuda_graphs: ClassVar[bool] = False
    supports_fp8_kv_cache: ClassVar[bool] = False
    # The ops its impl calls: decode graphs need every one of them graph-safe on the platform.
    ops: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]:
        """The class that runs attention for one layer."""

    @staticmethod
    @abstractmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        """The class that turns a step's `AttentionInputs` into this backend's metadata."""

    @staticmethod
    @abstractmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together)."""

    @classmethod
    def validate(cls, head_size: int, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot run the given head size or dtype."""
        if dtype not in cls.supported_dtypes:
            raise ValueError(f"attention backend {cls.name} does not support dtype {dtype}")
        if cls.supported_head_sizes is not None and head_size not in cls.supported_head_sizes:
            raise ValueError(
                f"attention backend {cls.name} supports head sizes {cls.supported_head_sizes}, got {head_size}"
            )

    @classmethod
    def validate_kv_cache_dtype(cls, kv_cache_dtype: torch.dtype, model_dtype: torch.dtype) -> None:
        """ValueError if this backend cannot keep its KV cache in `kv_cache_dtype`."""
        if kv_cache_dtype != model_dtype and not cls.supports_fp8_kv_cache:
            raise ValueError(f"attention backend {cls.name} does not support an FP8 KV cache; use PAGED_ATTN or "
                             "--kv-cache-dtype auto")

    @classmethod
    def graph_blockers(cls, kernel_choices: dict[str, KernelChoice]) -> list[str]:
        """Why decode graphs cannot capture this backend here (empty when they can)."""
        if not cls.supports_cuda_graphs:
            return [f"the {cls.name} attention backend"]
        return [f"{op} ({kernel_choices[op].impl})" for op in cls.ops
                if op in kernel_choices and not kernel_choices[op].graph_safe]
