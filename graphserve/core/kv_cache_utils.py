"""Prefix-cache block hashing: a chained sha256 over (parent block hash, the block's token ids, extra keys).

A block's KV depends on every token before it, so block i is named by the hash of block i-1 plus its own tokens:
equal hashes mean equal full prefixes (sha256 makes a collision practically impossible, unlike the 64-bit,
forgeable Python `hash()` early vLLM used). Only full blocks are ever hashed; a partial block is still being
written and is never shared. Extra keys carry whatever else changes the KV of equal tokens: the per-request
`cache_salt` (tenant isolation) today, the LoRA adapter identity and multimodal hashes when those land.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphserve.core.request import Request

BlockHash = bytes  # a sha256 digest (32 bytes)

# The parent of every first block. Random per process, so hashes cannot be predicted (or forged) from outside;
# a multi-process deployment that wants to share caches would have to share this seed.
NONE_HASH: BlockHash = os.urandom(32)

_PACKERS: dict[int, struct.Struct] = {}  # token count -> its little-endian layout (one per block size in use)


def hash_block_tokens(
    parent_block_hash: BlockHash | None,
    block_token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """sha256 of (parent hash or NONE_HASH, the block's token ids, extra keys), canonically serialized."""
    num_tokens = len(block_token_ids)
    packer = _PACKERS.get(num_tokens)
    if packer is None:
        packer = _PACKERS[num_tokens] = struct.Struct(f"<I{num_tokens}q")
    # Fixed-width fields (32-byte parent, token count, int64 tokens) make the byte string unambiguous; the
    # extra keys come last, behind a marker byte, pickled (deterministic for tuples of str/int/bytes).
    data = (parent_block_hash or NONE_HASH) + packer.pack(num_tokens, *block_token_ids)
    if extra_keys:
        data += b"\x01" + pickle.dumps(extra_keys, protocol=4)
    return hashlib.sha256(data).digest()


def block_extra_keys(request: Request, block_index: int) -> tuple[Any, ...] | None:
    """The non-token keys of one block of the request (None when there are none).

    The salt and the LoRA adapter go into the first block only: the chain carries them into every later hash, so
    a request never reuses blocks computed under another adapter (or the base model), nor another tenant's.
    """
    if block_index != 0:
        return None
    keys: tuple[Any, ...] = ()
    if request.cache_salt is not None:
        keys += ("cache_salt", request.cache_salt)
    if request.lora_request is not None:
        keys += request.lora_request.cache_key
    return keys or None


def extend_block_hashes(request: Request, block_size: int, num_tokens: int) -> list[BlockHash]:
    """Extend `request.block_hashes` to the full blocks among its first `num_tokens` known tokens; return it.

    Tokens never change once known (preemption keeps them), so the hashes are computed once per request.
    """
    block_hashes = request.block_hashes
    token_ids = request.all_token_ids
    num_full_blocks = min(num_tokens, len(token_ids)) // block_size
    if len(block_hashes) >= num_full_blocks:
        return block_hashes
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full_blocks):
        start = i * block_size
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], block_extra_keys(request, i))
        block_hashes.append(parent)
    return block_hashes
