"""Per-request block tables on top of the BlockPool."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from graphserve.core.block_pool import BlockPool, KVCacheBlock

if TYPE_CHECKING:
    from graphserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


class KVCacheManager:
    """Owns the block table of every request that holds KV blocks."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}

    @property
    def usage(self) -> float:
        """Fraction of the KV pool in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        """Blocks no request holds."""
        return self.block_pool.get_num_free_blocks()

    def allocate_slots(self, request: "Request", num_new_tokens: int) -> Optional[list[KVCacheBlock]]:
        """Grow the request's block table so its computed tokens plus `num_new_tokens` fit.

        Returns the newly added blocks (often none: a decode token usually fits the last block), or None, with
        nothing allocated, when the pool has too few free blocks.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        req_id = request.request_id
        blocks = self.req_to_blocks.get(req_id)
        num_required = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        num_missing = num_required - (len(blocks) if blocks is not None else 0)
        if num_missing <= 0:
            return []
        if num_missing > self.block_pool.get_num_free_blocks():
            return None
        new_blocks = self.block_pool.get_new_blocks(num_missing)
        if blocks is None:
            self.req_to_blocks[req_id] = list(new_blocks)
        else:
            blocks.extend(new_blocks)
        return new_blocks

    def free(self, request: "Request") -> None:
        """Release every block of the request (no-op when it holds none)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        if blocks:
            # Tail first: once prefix caching keeps freed blocks around, the LRU queue then evicts a request's
            # last (least shareable) blocks before its prefix.
            self.block_pool.free_blocks(reversed(blocks))

    def get_blocks(self, req_id: str) -> list[KVCacheBlock]:
        """The request's block table (empty when it holds no blocks); do not mutate."""
        return self.req_to_blocks.get(req_id, [])

    def get_block_ids(self, req_id: str) -> list[int]:
        """Block ids of the request's block table, in token order."""
        return [block.block_id for block in self.req_to_blocks.get(req_id, ())]
