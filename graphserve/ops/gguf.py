"""GGUF (llama.cpp) quant types kept as their blocks: `graphserve::gguf_dequantize` and `graphserve::gguf_gemm`.

A GGUF weight [N, K] is stored as the file stores it: `qweight` [N, K / block_size * type_size] uint8, each row a
run of blocks of `block_size` weights in `type_size` bytes. The block layouts (ggml-common.h; checked against the
`gguf` package's dequantization in tests/ops/test_gguf_ops.py), with d, m, dmin fp16 and e a weight's index in its
block:
- Q4_0 [d, qs 16]: w = d * (q - 8), q = nibble e//16 of qs[e % 16];
- Q4_1 [d, m, qs 16]: w = d * q + m;
- Q5_0 [d, qh u32, qs 16]: q = nibble | (bit e of qh) << 4, w = d * (q - 16);  Q5_1 [d, m, qh, qs]: w = d * q + m;
- Q8_0 [d, qs int8 32]: w = q * d;
- Q2_K [scales 16, qs 64, d, dmin] (256 weights, 16 sub-blocks of 16): scale byte = sc | mn << 4,
  w = d * sc * q - dmin * mn, q = 2 bits (2 * ((e % 128) // 32)) of qs[32 * (e // 128) + e % 32];
- Q3_K [hmask 32, qs 64, scales 12, d]: 6-bit signed scales (bias 32), q = the Q2_K field - 4 unless bit e // 32
  of hmask[e % 32] is set, w = d * sc * q;
- Q4_K [d, dmin, scales 12, qs 128] (8 sub-blocks of 32, 6-bit scales and mins packed in 12 bytes):
  w = d * sc * q - dmin * mn, q = nibble (e % 64) // 32 of qs[32 * (e // 64) + e % 32];
- Q5_K [d, dmin, scales 12, qh 32, qs 128]: the Q4_K nibble | (bit e // 32 of qh[e % 32]) << 4;
- Q6_K [ql 128, qh 64, scales int8 16, d]: q = nibble of ql | 2 bits of qh << 4, minus 32, w = d * sc * q;
- F32, F16, BF16: plain values (a GGUF may keep a projection unquantized).

The torch references here are the CPU implementation (dequantize in fp32, one matmul) and the oracle of the
Triton kernels (ops/triton/gguf.py).
"""
from __future__ import annotations

import torch

from graphserve.ops._register import register_op

# ggml type id -> (name, weights per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
GGML_TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
# Byte offsets of each quantized type's fp16 fields (d, m, dmin) inside a block: what random test and benchmark
# blocks must overwrite with finite values.
FP16_FIELD_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                      "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FLOAT_TYPES = frozenset({0, 1, 30})


def type_name(qtype: int) -> str:
    """The ggml name of a type id ("Q4_K"), or "type <id>" for one graphserve does not know."""
    return GGML_TYPES[qtype][0] if qtype in GGML_TYPES else f"type {qtype}"


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of `k` weights; ValueError when the type is unsupported or k is not whole blocks."""
    if qtype not in GGML_TYPES:
        raise ValueError(f"GGUF quant type {qtype} is not supported; supported: "
                         f"{', '.join(name for name, _, _ in GGML_TYPES.values())}")
    name, block, size = GGML_TYPES[qtype]
    if k % block:
        raise ValueError(f"a row of {k} weights is not a whole number of {name} blocks of {block}")
    return k // block * size


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:  # [nb, size] uint8 -> [nb, 1] fp32
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:  # [nb, n] uint8 -> [nb, 2n] int32: all low nibbles, then high
    q = qs.int()
    return torch.cat([q & 0xF, q >> 4], dim=1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[nb, b] uint8 -> [nb, count, b] int32: bit i of every byte in plane i."""
    shifts = torch.arange(count, dtype=torch.int32, device=packed.device).view(1, count, 1)
    return (packed.int().unsqueeze(1) >> shifts) & 1


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[nb, 64] uint8 -> [nb, 256] int32: the 2-bit fields of Q2_K / Q3_K (two halves of 32 bytes, 4 fields each)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).view(1, 1, 4, 1)
    return ((qs.int().view(-1, 2, 1, 32) >> shifts) & 3).reshape(qs.shape[0], 256)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins ([nb, 8] fp32 each)."""
    s = scales.int()
    sc_lo, mn_lo, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([sc_lo & 0x3F, (mixed & 0xF) | ((sc_lo >> 2) & 0x30)], dim=1)
    mn = torch.cat([mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _dequantize_blocks(qtype: int, b: torch.Tensor) -> torch.Tensor:  # [nb, type_size] uint8 -> [nb, block] fp32
    nb = b.shape[0]
    if qtype == 0:
        return b.contiguous().view(torch.float32)
    if qtype in (1, 30):
        return b.contiguous().view(torch.float16 if qtype == 1 else torch.bfloat16).float()
    if qtype == 8:
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)
    if qtype in (2, 3):
        offset = 2 if qtype == 2 else 4
        q = _nibbles(b[:, offset:offset + 16]).float()
        return _f16(b, 0) * (q - 8) if qtype == 2 else _f16(b, 0) * q + _f16(b, 2)
    if qtype in (6, 7):
        offset = 2 if qtype == 6 else 4
        high = _bits(b[:, offset:offset + 4], 8).transpose(1, 2).reshape(nb, 32)  # bit e of the little-endian u32
        q = (_nibbles(b[:, offset + 4:offset + 20]) | (high << 4)).float()
        return _f16(b, 0) * (q - 16) if qtype == 6 else _f16(b, 0) * q + _f16(b, 2)
    if qtype == 10:
        sc = b[:, :16].int()
        dl = (_f16(b, 80) * (sc & 0xF).float()).view(nb, 16, 1)
        ml = (_f16(b, 82) * (sc >> 4).float()).view(nb, 16, 1)
        return (dl * _crumbs(b[:, 16:80]).float().view(nb, 16, 16) - ml).view(nb, 256)
    if qtype == 11:
        s = b[:, 96:108].int()
        low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)  # [nb, 16]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(1, 4, 1)
        high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(nb, 16)
        dl = (_f16(b, 108) * ((low | (high << 4)) - 32).float()).view(nb, 16, 1)
        hbit = _bits(b[:, :32], 8).reshape(nb, 256)  # plane e // 32, byte e % 32
        q = (_crumbs(b[:, 32:96]) - 4 * (1 - hbit)).float()
        return (dl * q.view(nb, 16, 16)).view(nb, 256)
    if qtype in (12, 13):
        sc, mn = _k_scales_mins(b[:, 4:16])
        d = (_f16(b, 0) * sc).view(nb, 8, 1)
        dm = (_f16(b, 2) * mn).view(nb, 8, 1)
        qs = b[:, 16:144] if qtype == 12 else b[:, 48:176]
        q = ((qs.int().view(nb, 4, 1, 32) >> torch.tensor([0, 4], device=b.device).view(1, 1, 2, 1)) & 0xF)
        q = q.reshape(nb, 8, 32)
        if qtype == 13:
            q = q | (_bits(b[:, 16:48], 8) << 4)  # plane e // 32, byte e % 32
        return (d * q.float() - dm).view(nb, 256)
    if qtype == 14:
        ql = (b[:, :128].int().view(nb, 2, 1, 64) >> torch.tensor([0, 4], device=b.device).view(1, 1, 2, 1)) & 0xF
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(1, 1, 4, 1)
        qh = (b[:, 128:192].int().view(nb, 2, 1, 32) >> shifts) & 3
        q = (ql.reshape(nb, 256) | (qh.reshape(nb, 256) << 4)) - 32
        d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).view(nb, 16, 1)
        return (d * q.float().view(nb, 16, 16)).view(nb, 256)
    raise ValueError(f"GGUF quant type {type_name(qtype)} is not supported")


def dequantize_ref(qweight: torch.Tensor, qtype: int, k: int) -> torch.Tensor:  # [N, row_bytes] -> [N, K] fp32
    """The dense fp32 weight of a GGUF-quantized matrix of `k` columns."""
    n, expected = qweight.shape[0], row_bytes(qtype, k)
    if qweight.shape[1] != expected:
        raise ValueError(f"{type_name(qtype)} rows of {k} weights take {expected} bytes, not {qweight.shape[1]}")
    _, block, size = GGML_TYPES[qtype]
    blocks = qweight.reshape(n * (k // block), size)
    return _dequantize_blocks(qtype, blocks).reshape(n, k)


def _gguf_dequantize_ref(
    out: torch.Tensor,  # [N, K]
    qweight: torch.Tensor,  # [N, K / block * type_size] uint8
    qtype: int,
) -> None:
    """out <- the dense weight in out's dtype."""
    out.copy_(dequantize_ref(qweight, qtype, out.shape[1]))


def _gguf_gemm_ref(
    out: torch.Tensor,  # [M, N]
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K / block * type_size] uint8
    qtype: int,
) -> None:
    """out <- x @ W.T, in fp32."""
    out.copy_(x.float() @ dequantize_ref(qweight, qtype, x.shape[1]).t())


register_op("gguf_dequantize", _gguf_dequantize_ref, mutates_args=("out",))
register_op("gguf_gemm", _gguf_gemm_ref, mutates_args=("out",))


def gguf_gemm(x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> torch.Tensor:  # [M, K] -> [M, N], x's dtype
    """x @ W.T of a GGUF-quantized matrix W [N, K]."""
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.graphserve.gguf_gemm(out, x, qweight, qtype)
    return out


def gguf_dequantize(qweight: torch.Tensor, qtype: int, k: int, dtype: torch.dtype) -> torch.Tensor:  # -> [N, K]
    """The dense weight (embedding rows, or one dequantization for a large batch)."""
    out = torch.empty(qweight.shape[0], k, dtype=dtype, device=qweight.device)
    torch.ops.graphserve.gguf_dequantize(out, qweight, qtype)
    return out
