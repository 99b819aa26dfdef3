"""Rotary position embedding applied in place to the packed query and key of a batch."""
import torch

from graphserve.ops._register import register_op


def _rotate(
    x: torch.Tensor,  # [num_tokens, num_heads, rotary_dim] float32
    cos: torch.Tensor,  # [num_tokens, 1, rotary_dim // 2] float32
    sin: torch.Tensor,  # [num_tokens, 1, rotary_dim // 2] float32
    is_neox: bool,
) -> torch.Tensor:
    """Rotate pairs: NeoX pairs dim i with i + d/2 (halves), GPT-J pairs 2i with 2i + 1 (interleaved)."""
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _rotary_embedding_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
    is_neox: bool,
) -> None:
    """Rotate the first rotary_dim dims of every head of query and key in place (fp32 math)."""
    num_tokens = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[-1]
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
    for x in (query, key):
        # view (not reshape) so the write lands in the caller's storage, also for strided q/k slices of qkv.
        heads = x.view(num_tokens, -1, head_size)
        rotated = _rotate(heads[..., :rotary_dim].float(), cos, sin, is_neox)
        heads[..., :rotary_dim] = rotated.to(x.dtype)


register_op("rotary_embedding", _rotary_embedding_ref, mutates_args=("query", "key"))


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads * head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    head_size: int,
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]
    is_neox: bool,
) -> None:
    """Apply RoPE in place to query and key."""
    torch.ops.graphserve.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
