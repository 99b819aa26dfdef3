"""Roofline arithmetic: what a decode step must read and what a prefill must compute, against device ceilings.

The ceilings are measured, never guessed: a device missing from `DEVICE_CEILINGS` (every CPU) gets None, and
so do the fractions computed against it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Ceilings:
    """A device's measured limits: copy bandwidth (bytes/s) and dense bf16 matmul throughput (FLOP/s)."""

    bytes_per_s: float
    flop_per_s: float
    source: str

    def to_dict(self) -> dict:
        """The ceilings as plain JSON values."""
        return asdict(self)


# Device name (as torch reports it) -> its measured ceilings (../shared/docs/performance.md, "The physical limits").
# Exact names only: a variant such as the H200 NVL has other clocks and power limits, so it was never measured.
DEVICE_CEILINGS: dict[str, Ceilings] = {
    "NVIDIA H200": Ceilings(4.25e12, 801e12, "measured on the H200: device-to-device copy, bf16 matmul"),
}


def device_ceilings(device_name: str) -> Ceilings | None:
    """The measured ceilings of the device called `device_name`, or None when it was never measured."""
    return DEVICE_CEILINGS.get(device_name.strip())


def fraction(achieved: float | None, ceiling: float | None) -> float | None:
    """achieved / ceiling rounded to 4 places; None when either is unknown."""
    if achieved is None or ceiling is None:
        return None
    return round(achieved / ceiling, 4)


def sig(value: float | None, digits: int = 4) -> float | None:
    """`value` rounded to `digits` significant digits (tiny CPU figures keep their precision); None stays None."""
    return None if value is None else float(f"{value:.{digits}g}")


def causal_pairs(q_len: int, seq_len: int, window: int | None = None) -> int:
    """(query, key) pairs a chunk of `q_len` queries ending at `seq_len` attends to under a causal (window) mask."""
    if window is None:
        return q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2
    # The query at position p - 1 sees its last min(p, window) keys.
    return sum(min(p, window) for p in range(seq_len - q_len + 1, seq_len + 1))


@dataclass(frozen=True)
class ModelCost:
    """A model's per-token costs, from its loaded parameters and its attention shape."""

    num_params: int  # every parameter tensor once (a tied head counted once)
    embedding_params: int  # the input embedding table, read one row per token (0 when tied to the head)
    lm_head_params: int  # the output projection, applied once per sampled token
    decode_weight_bytes: int  # bytes one decode step reads: every parameter except the embedding rows
    kv_bytes_per_token: int  # K and V of one token over all layers
    num_layers: int
    num_heads: int
    head_dim: int
    sliding_window: int | None = None

    @property
    def matmul_params(self) -> int:
        """Parameters that multiply every token's activations (all but the embedding table and the head)."""
        return self.num_params - self.embedding_params - self.lm_head_params

    def decode_step_bytes(self, context_lens: Sequence[int]) -> int:
        """Fewest bytes one decode step moves: the weights once plus every sequence's cached K/V."""
        window = self.sliding_window
        kv_tokens = sum(c if window is None else min(c, window) for c in context_lens)
        return self.decode_weight_bytes + kv_tokens * self.kv_bytes_per_token

    def decode_step_flops(self, context_lens: Sequence[int]) -> int:
        """FLOPs of one decode step: each weight (head included) once per sequence, plus attention over contexts."""
        window = self.sliding_window
        kv_tokens = sum(c if window is None else min(c, window) for c in context_lens)
        per_seq = 2 * (self.matmul_params + self.lm_head_params)
        return per_seq * len(context_lens) + self.num_layers * 4 * self.num_heads * self.head_dim * kv_tokens

    def prefill_flops(self, prompt_len: int) -> int:
        """FLOPs of a whole-prompt prefill: 2 x matmul params per token, the head once, causal attention."""
        attention = 4 * self.num_heads * self.head_dim * causal_pairs(prompt_len, prompt_len, self.sliding_window)
        return 2 * self.matmul_params * prompt_len + 2 * self.lm_head_params + self.num_layers * attention

    def to_dict(self) -> dict:
        """The costs as plain JSON values."""
        return {**asdict(self), "matmul_params": self.matmul_params}


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def loaded_model(llm: Any):
    """The nn.Module an `LLM` runs, or None when the engine does not expose one in this process."""
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    runner = getattr(getattr(engine_core, "model_executor", None), "model_runner", None)
    return getattr(runner, "model", None)


def model_cost(model: Any, model_config: Any) -> ModelCost:
    """Count `model`'s parameters by role (embedding, head, the rest) and derive the per-token costs."""
    from graphserve.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    tensors: dict[int, Any] = {id(p): p for p in model.parameters()}
    head_ids = {id(p) for m in model.modules() if isinstance(m, ParallelLMHead) for p in m.parameters()}
    # A tied embedding is the head's weight: a decode step reads all of it, so it counts as the head.
    embedding_ids = {id(p) for m in model.modules()
                     if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
                     for p in m.parameters()} - head_ids
    embedding_bytes = sum(tensors[i].numel() * tensors[i].element_size() for i in embedding_ids)
    total_bytes = sum(p.numel() * p.element_size() for p in tensors.values())
    mc = model_config
    kv_element_size = _DTYPE_BYTES[mc.dtype]  # the KV cache is allocated in the model dtype
    return ModelCost(
        num_params=sum(p.numel() for p in tensors.values()),
        embedding_params=sum(tensors[i].numel() for i in embedding_ids),
        lm_head_params=sum(tensors[i].numel() for i in head_ids),
        decode_weight_bytes=total_bytes - embedding_bytes,
        kv_bytes_per_token=mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 2 * kv_element_size,
        num_layers=mc.num_hidden_layers,
        num_heads=mc.num_attention_heads,
        head_dim=mc.head_dim,
        sliding_window=mc.sliding_window,
    )
