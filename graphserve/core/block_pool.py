"""The pool of physical KV-cache blocks: reference counts, an LRU free queue and the prefix-cache index.

Every block id in [0, num_blocks) is usable; no null block is reserved. The model runner pads block tables and
skips padded tokens through slot_mapping == -1, so it never needs a sentinel block.

Prefix caching (vLLM V1 style): a full, computed block gets its chained hash (kv_cache_utils) and enters
`cached_block_hash_to_block`. When its last reference goes it joins the free queue *with* its hash and content, so
a later request can still hit it ("touch" pulls it back out); only when the queue hands it out again as a new
block is it evicted (hash dropped). The queue's head is therefore both the next block handed out and the least
recently used cached block.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from graphserve.core.kv_cache_utils import BlockHash


class KVCacheBlock:
    """One physical block of `block_size` KV slots, shared by `ref_cnt` block tables."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set while the block is in the prefix-cache index

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash[:4].hex()}"
        return f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class BlockPool:
    """Hands out blocks, takes them back when their last reference is dropped.

    Free blocks wait in LRU order (least recently freed first). The queue is an OrderedDict keyed by block id, so
    taking from the head, appending at the tail and pulling out any block ("touch", needed when prefix caching
    revives a freed block that still holds a cached prefix) are all O(1).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free_block_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # One block per hash: when two requests computed the same block at once, the second copy simply stays
        # unhashed (and is reused as a plain block once freed).
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    def get_num_free_blocks(self) -> int:
        """Blocks nobody references."""
        return len(self._free_block_queue)

    def get_usage(self) -> float:
        """Fraction of blocks referenced by at least one block table, in [0, 1]."""
        return 1.0 - len(self._free_block_queue) / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free queue, each with ref_cnt 1, evicting cached ones."""
        free_queue = self._free_block_queue
        if num_blocks > len(free_queue):
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {len(free_queue)} free")
        popitem = free_queue.popitem
        new_blocks = []
        for _ in range(num_blocks):
            block = popitem(last=False)[1]
            if block.block_hash is not None:
                # It is about to be overwritten: its cached content is gone.
                del self.cached_block_hash_to_block[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block holding the full prefix named by `block_hash`, if it is still cached."""
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_blocks(
        self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[BlockHash], start: int, end: int
    ) -> None:
        """Index blocks[start:end] (full, computed, held by the caller) under block_hashes[start:end]."""
        cached = self.cached_block_hash_to_block
        for i in range(start, end):
            block = blocks[i]
            block_hash = block_hashes[i]
            if block.block_hash is not None:
                if block.block_hash != block_hash:
                    raise RuntimeError(f"block {block.block_id} is cached under another hash")
                continue
            if block_hash not in cached:
                block.block_hash = block_hash
                cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use, since its hash must stay valid."""
        if len(self._free_block_queue) != self.num_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix-cache index (in use or free)."""
        return len(self.cached_block_hash_to_block)

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 joins the tail of the free queue."""
        free_queue = self._free_block_queue
        for block in blocks:
            if block.ref_cnt <= 0:
                # Freeing twice would put the block in two block tables later: fail loudly instead.
                raise RuntimeError(f"block {block.block_id} freed more times than it was referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free_queue[block.block_id] = block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add one reference to each block (sharing), pulling free ones out of the free queue."""
        free_queue = self._free_block_queue
        for block in blocks:
            if block.ref_cnt == 0:
                del free_queue[block.block_id]
            block.ref_cnt += 1

    def iter_free_block_ids(self) -> Iterator[int]:
        """Free block ids in eviction order (the next one handed out first)."""
        return iter(self._free_block_queue)

    def is_free(self, block: KVCacheBlock) -> bool:
        """Whether the block sits in the free queue."""
        return block.block_id in self._free_block_queue
