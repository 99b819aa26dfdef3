"""KV cache sizing and allocation: one tensor per attention layer, in the attention backend's shape."""
from __future__ import annotations

import math

import torch

from graphserve.attention.backends.base import AttentionBackend
from graphserve.config import CacheConfig, ModelConfig, SchedulerConfig


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the KV pool: the model dtype ("auto") or an FP8 type ("fp8" means e4m3)."""
    if cache_dtype == "auto":
        return model_dtype
    return {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[cache_dtype]


def kv_cache_bytes_per_block(
    model_config: ModelConfig, block_size: int, dtype: torch.dtype, attn_backend: type[AttentionBackend]
) -> int:
    """Bytes one block occupies across all layers, K and V."""
    shape = attn_backend.get_kv_cache_shape(1, block_size, model_config.num_key_value_heads, model_config.head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    return math.prod(shape) * elem * model_config.num_hidden_layers


def determine_num_blocks(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    scheduler_config: SchedulerConfig,
    block_bytes: int,
    available_bytes: int,
) -> int:
    """How many blocks the pool gets: the explicit budget, else what the platform offers.

    The pool is never made larger than max_num_seqs full-length sequences could use, so a small model on a
    big budget does not reserve memory it can never touch.
    """
    if cache_config.num_blocks is not None:
        return cache_config.num_blocks
    budget = cache_config.kv_cache_memory if cache_config.kv_cache_memory is not None else available_bytes
    num_blocks = budget // block_bytes
    blocks_per_seq = math.ceil(scheduler_config.max_model_len / cache_config.block_size)
    num_blocks = min(num_blocks, blocks_per_seq * scheduler_config.max_num_seqs)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"kv_cache_memory of {budget} bytes holds {num_blocks} blocks of {cache_config.block_size} tokens, "
            f"fewer than one sequence of max_model_len={scheduler_config.max_model_len} needs ({blocks_per_seq}); "
            "raise --kv-cache-memory or lower --max-model-len"
        )
    return int(num_blocks)


def allocate_kv_caches(
    model_config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: type[AttentionBackend],
) -> list[torch.Tensor]:
    """Per layer: one zeroed tensor of the backend's KV cache shape."""
    shape = attn_backend.get_kv_cache_shape(num_blocks, block_size, model_config.num_key_value_heads,
                                            model_config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_hidden_layers)]
