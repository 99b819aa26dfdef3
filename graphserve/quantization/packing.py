"""Bit (un)packing of the checkpoint formats (../shared/docs/formats.md §1–3), in torch, on any device.

Values are unsigned b-bit fields of int32 words; field i of a word holds bits [b*i, b*(i+1)), field 0 least
significant. "Sequential" packing (GPTQ, SqueezeLLM) puts consecutive values in consecutive fields; AWQ
interleaves the 8 nibbles of a word (AWQ_ORDER); GPTQ's 3-bit format spreads 32 values over 3 words.
The engine's own layout (what the GEMM ops read) is sequential along K, for 2, 4 or 8 bits.
"""
from __future__ import annotations

import torch

# Nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]; column 8c + j sits in nibble AWQ_REVERSE_ORDER[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _fields(words: torch.Tensor, shifts: list[int], bits: int) -> torch.Tensor:
    """[..., W] int32 words -> [..., W, len(shifts)] int32 values at those bit offsets."""
    shift = torch.tensor(shifts, dtype=torch.int32, device=words.device)
    return (words.unsqueeze(-1) >> shift) & ((1 << bits) - 1)


def unpack_sequential(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack b-bit values (b in 2, 4, 8) packed sequentially along `dim` of an int32 tensor."""
    if bits not in (2, 4, 8):
        raise ValueError(f"sequential packing holds 2, 4 or 8 bits, got {bits}")
    moved = packed.movedim(dim, -1)
    values = _fields(moved, [bits * i for i in range(32 // bits)], bits).flatten(-2)
    return values.movedim(-1, dim)


def unpack_3bit(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Unpack GPTQ's 3-bit format along `dim` (formats.md §2.4): every 3 words are one 96-bit little-endian
    stream holding 32 values, value j at stream bits [3j, 3j + 3) (v10 and v21 straddle two words)."""
    moved = packed.movedim(dim, -1)
    if moved.shape[-1] % 3:
        raise ValueError(f"3-bit packing needs a multiple of 3 words along dim {dim}, got {moved.shape[-1]}")
    words = moved.reshape(*moved.shape[:-1], -1, 3).to(torch.int64) & 0xFFFFFFFF  # unsigned
    values = []
    for j in range(32):
        word, bit = divmod(3 * j, 32)
        v = words[..., word] >> bit
        if bit > 29:  # the rest of the value is at the bottom of the next word
            v = v | (words[..., word + 1] << (32 - bit))
        values.append(v & 0x7)
    return torch.stack(values, dim=-1).flatten(-2).to(torch.int32).movedim(-1, dim)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] AWQ words (nibbles interleaved by AWQ_ORDER along the last dim) -> [R, 8C] values in column order."""
    return _fields(packed, [4 * i for i in AWQ_REVERSE_ORDER], 4).flatten(-2)


def pack_sequential(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack b-bit values (b in 2, 4, 8) sequentially along `dim` into int32 words."""
    if bits not in (2, 4, 8):
        raise ValueError(f"sequential packing holds 2, 4 or 8 bits, got {bits}")
    per_word = 32 // bits
    moved = values.movedim(dim, -1)
    if moved.shape[-1] % per_word:
        raise ValueError(f"{moved.shape[-1]} values along dim {dim} do not fill whole words of {per_word}")
    fields = moved.reshape(*moved.shape[:-1], -1, per_word).to(torch.int64) & ((1 << bits) - 1)
    shift = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (fields << shift).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()
