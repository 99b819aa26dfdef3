"""Attention backends (interface, registry, PAGED_ATTN and TORCH_SDPA), their metadata, the forward context."""
