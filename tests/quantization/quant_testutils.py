"""Test-side oracle for quantized checkpoints: AWQ (AutoAWQ GEMM), GPTQ (v1 "gptq" / v2 "gptq_v2") and SqueezeLLM.

Written from `shared/docs/formats.md` sections 1-3 and Appendix B, independently of `graphserve.quantization` and
`graphserve.ops` (this module must never import them: it is the oracle the engine is tested against).

Conventions (as in the spec):
- a dense weight `w` is in `nn.Linear` layout `[N=out, K=in]`, float32; the formats store `Wt = w.T`, `[K, N]`;
- scales (and SqueezeLLM lookup tables) are fp16 on disk; every `quantize_*` returns `(tensors, dequantized)` where
  `tensors` holds exactly the on-disk names/dtypes/shapes and `dequantized` (`[N, K]` float32) is exactly what a
  correct loader reconstructs from `tensors`, computed in float32 from the fp16 values: `(q - z) * scale.float()`.
  (|q - z| <= 255 and fp16 has an 11-bit significand, so that product is exact in float32 whatever the order.)

Packers here are vectorised; the `dequantize_*` reference unpackers are deliberately written differently (plain Python
integers, field by field, following the spec's wording) so the tests cross-check one against the other.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import zlib

import torch

__all__ = [
    "AWQ_ORDER", "AWQ_REVERSE_ORDER", "GPTQ_V1_TO_V2_WORD_OFFSET", "LINEAR_PROJECTIONS", "REMOVE",
    "act_order_seed", "dequantize_awq", "dequantize_gptq", "dequantize_squeezellm", "drop_tensor",
    "load_checkpoint_tensors",
    "pack_awq", "pack_gptq", "pack_squeezellm", "quant_config_location", "quantize_awq", "quantize_gptq",
    "quantize_squeezellm", "reference_dequantize_checkpoint", "reference_model", "replace_tensor",
    "set_quant_field", "truncate_tensor", "write_quantized_checkpoint",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)            # nibble i of a packed AWQ word holds logical column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)    # logical column 8c + j sits in nibble AWQ_REVERSE_ORDER[j]
GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
# GPTQModel's whole-word v1 -> v2 conversion constants (+1 in every field); 3-bit has none (fields straddle words).
GPTQ_V1_TO_V2_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJ_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.\d+\.(?:self_attn|mlp)\.(?P<proj>\w+))\.weight$")
_U32 = 0xFFFFFFFF


class _Remove:
    def __repr__(self):
        return "REMOVE"


REMOVE = _Remove()  # set_quant_field(dir, key, REMOVE) deletes the key


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _as_weight(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("w must be a 2-D floating tensor in nn.Linear layout [N=out, K=in]")
    return w.detach().to("cpu", torch.float32)


def _group(k: int, group_size: int) -> int:
    if group_size == -1:
        return k
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or -1, got {group_size!r}")
    return group_size


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the int32 with the same bit pattern."""
    words = words & _U32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """Round a positive float32 scale to fp16 (kept > 0 and finite); returned as fp16."""
    s16 = s.to(torch.float16)
    tiny = torch.tensor(torch.finfo(torch.float16).tiny, dtype=torch.float16)
    s16 = torch.where(s16 > 0, s16, tiny)
    if not torch.isfinite(s16).all():
        raise ValueError("weights too large for an fp16 scale")
    return s16


def _pack_bitstream_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: every 32 consecutive rows form one contiguous little-endian bit stream of `bits` words.

    Value j of a 32-value block occupies stream bits [bits*j, bits*j + bits); word w holds stream bits [32w, 32w+32).
    For b in {2,4,8} this is "field i at bit b*i" (spec 2.2); for b=3 it is exactly the layout of spec 2.4.
    Values are OR-ed in as uint32 two's complement and truncated to 32 bits, like AutoGPTQ's numpy packer, so an
    out-of-range value (the v1 "zero - 1 = -1" underflow) corrupts the higher fields of its word, as in real files.
    """
    rows, cols = values.shape
    if rows * bits % 32:
        raise ValueError(f"cannot pack {rows} values of {bits} bits into whole int32 words")
    v = values.to(torch.int64) & _U32
    out = torch.zeros(rows * bits // 32, cols, dtype=torch.int64)
    for j in range(rows):
        bit = j * bits
        word, shift = divmod(bit, 32)
        out[word] |= (v[j] << shift) & _U32
        spill = shift + bits - 32
        if spill > 0:  # the high part of the value continues in the next word
            out[word + 1] |= (v[j] >> (32 - shift)) & ((1 << spill) - 1)
    return _to_int32(out)


def _u32_list(t: torch.Tensor) -> list:
    return (t.to(torch.int64) & _U32).tolist()


# ----------------------------------------------------------------------------------------------------------------
# AWQ (formats.md section 1)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    """Pack given AWQ codes: `codes` [K, N] and `zeros` [K/G, N] in [0, 15], `scales` [K/G, N] (cast to fp16).

    Returns (dict(qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]), dequantized [N, K] f32).
    """
    codes, zeros = codes.to(torch.int64), zeros.to(torch.int64)
    k, n = codes.shape
    if zeros.dim() != 2 or zeros.shape[1] != n or zeros.shape[0] == 0 or k % zeros.shape[0]:
        raise ValueError(f"zeros shape {tuple(zeros.shape)} does not fit codes {tuple(codes.shape)}")
    if tuple(scales.shape) != tuple(zeros.shape):
        raise ValueError("scales and zeros must have the same shape [K/G, N]")
    if n % 8:
        raise ValueError(f"AWQ needs N % 8 == 0 (got N={n})")
    for name, t in (("codes", codes), ("zeros", zeros)):
        if t.min() < 0 or t.max() > 15:
            raise ValueError(f"AWQ {name} must be in [0, 15]")
    g = k // zeros.shape[0]
    order = torch.tensor(AWQ_ORDER)

    def pack(m):  # [R, N] -> [R, N/8]; nibble i <- column 8c + AWQ_ORDER[i]
        m = m.reshape(m.shape[0], n // 8, 8)[:, :, order]
        return _to_int32(sum(m[:, :, i] << (4 * i) for i in range(8)))

    scales16 = scales.to(torch.float16).contiguous()
    zk = zeros.repeat_interleave(g, dim=0)
    sk = scales16.float().repeat_interleave(g, dim=0)
    deq = ((codes - zk).to(torch.float32) * sk).T.contiguous()
    return {"qweight": pack(codes), "qzeros": pack(zeros), "scales": scales16}, deq


def quantize_awq(w: torch.Tensor, group_size: int = 128):
    """AutoAWQ GEMM round-to-nearest quantization of `w` [N, K] (spec 1.2; asymmetric, z in [0, 15], no offset).

    Per group of G inputs of one output row: s = max(max - min, 1e-5) / 15 rounded to fp16 (the stored scale);
    z = clamp(-round(min / s), 0, 15); q = clamp(round(w / s) + z, 0, 15), s being the fp16 value in float32.
    (As in AutoAWQ, a group that does not straddle 0 gets z = 0 and clips; real and random weights straddle 0.)
    group_size -1 means G = K. Returns (dict(qweight, qzeros, scales), dequantized [N, K] float32).
    """
    w = _as_weight(w)
    n, k = w.shape
    g = _group(k, group_size)
    if k % g:
        raise ValueError(f"AWQ needs K % group_size == 0 (K={k}, group_size={g})")
    if n % 8:
        raise ValueError(f"AWQ needs N % 8 == 0 (N={n})")
    wt = w.T.reshape(k // g, g, n)
    wmin, wmax = wt.amin(dim=1), wt.amax(dim=1)
    s16 = _fp16_scale((wmax - wmin).clamp(min=1e-5) / 15)
    s = s16.float()
    z = torch.clamp(-torch.round(wmin / s), 0, 15)
    q = torch.clamp(torch.round(wt / s[:, None]) + z[:, None], 0, 15)
    return pack_awq(q.reshape(k, n).to(torch.int64), z.to(torch.int64), s16)


def dequantize_awq(tensors: dict, group_size: int) -> torch.Tensor:
    """Reference AWQ unpack (field by field, Python ints): Wt[k, 8c+j] = (nibble R[j] of qweight[k, c] - z) * s."""
    qweight, qzeros, scales = _u32_list(tensors["qweight"]), _u32_list(tensors["qzeros"]), tensors["scales"]
    k, n = len(qweight), scales.shape[1]
    g = _group(k, group_size)
    scale = scales.float().tolist()

    def field(word, j):
        return (word >> (4 * AWQ_REVERSE_ORDER[j])) & 0xF

    out = [[0.0] * k for _ in range(n)]
    for kk in range(k):
        grp = kk // g
        for col in range(n):
            c, j = divmod(col, 8)
            q, z = field(qweight[kk][c], j), field(qzeros[grp][c], j)
            out[col][kk] = float(q - z) * scale[grp][col]
    # float(q-z) * float(s) in Python is double; it is exact here (see module doc), so float32 loses nothing.
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ (formats.md section 2)


def _check_gptq_shapes(k: int, n: int, bits: int, checkpoint_format: str):
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    if k * bits % 32:
        raise ValueError(f"GPTQ {bits}-bit qweight needs K*{bits} % 32 == 0 (K={k})")
    if n * bits % 32:
        raise ValueError(f"GPTQ {bits}-bit qzeros [groups, N*{bits}/32] needs N*{bits} % 32 == 0 (N={n})")


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              checkpoint_format: str = "gptq"):
    """Pack given GPTQ codes. `codes` [K, N] in [0, 2^b-1] (original input order), `zeros` [groups, N] the logical
    zero points, `scales` [groups, N] (cast to fp16), `g_idx` [K] the group of each input row.

    v1 ("gptq") stores zero - 1, v2 ("gptq_v2") stores zero (spec 2.3). A v1 logical zero of 0 is stored as -1 and
    packed the way AutoGPTQ does (all-ones OR-ed in, corrupting the higher fields of that word): `dequantized` is then
    what the spec's v1 decoder `(field & mask) + 1` reconstructs from the bytes, NOT the intended weight.
    Returns (dict(qweight, qzeros, scales, g_idx), dequantized [N, K] float32).
    """
    codes, zeros = codes.to(torch.int64), zeros.to(torch.int64)
    k, n = codes.shape
    _check_gptq_shapes(k, n, bits, checkpoint_format)
    g_idx = g_idx.to(torch.int64)
    if tuple(g_idx.shape) != (k,):
        raise ValueError("g_idx must have shape [K]")
    if zeros.dim() != 2 or zeros.shape[1] != n or tuple(scales.shape) != tuple(zeros.shape):
        raise ValueError("zeros and scales must both be [groups, N]")
    if g_idx.min() < 0 or g_idx.max() >= zeros.shape[0]:
        raise ValueError("g_idx out of range of the groups")
    maxq = 2**bits - 1
    if codes.min() < 0 or codes.max() > maxq:
        raise ValueError(f"codes must be in [0, {maxq}]")
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    if stored.min() < -1 or stored.max() > maxq or (checkpoint_format == "gptq_v2" and stored.min() < 0):
        raise ValueError(f"zeros out of range for {bits}-bit {checkpoint_format}")
    qweight = _pack_bitstream_rows(codes, bits)
    qzeros = _pack_bitstream_rows(stored.T, bits).T.contiguous()
    scales16 = scales.to(torch.float16).contiguous()
    # what a loader sees: the packed zero fields (these differ from `stored` only after a v1 underflow)
    seen = _unpack_bitstream_rows(qzeros.T, bits, n).T
    effective = seen + 1 if checkpoint_format == "gptq" else seen
    deq = ((codes - effective[g_idx]).to(torch.float32) * scales16.float()[g_idx]).T.contiguous()
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales16, "g_idx": g_idx.to(torch.int32).contiguous()}
    return tensors, deq


def _unpack_bitstream_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Vectorised inverse of _pack_bitstream_rows (used only to mirror a v1 underflow into `dequantized`)."""
    w = words.to(torch.int64) & _U32
    out = torch.zeros(count, w.shape[1], dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(count):
        word, shift = divmod(j * bits, 32)
        v = w[word] >> shift
        if shift + bits > 32:
            v = v | (w[word + 1] << (32 - shift))
        out[j] = v & mask
    return out


def quantize_gptq(w: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                  checkpoint_format: str = "gptq", seed: int = 0, min_zero: int | None = None):
    """Round-to-nearest GPTQ-format quantization of `w` [N, K] (AutoGPTQ quantizer conventions, spec 2.3).

    Per group and output column: xmin = min(x, 0), xmax = max(x, 0); sym: xmax = max(|xmin|, xmax), xmin = -xmax,
    zero = 2^(b-1); asym: zero = round(-xmin / s). s = (xmax - xmin) / (2^b - 1) rounded to fp16 (a degenerate
    all-zero group uses xmin = -1, xmax = 1); q = clamp(round(x / s) + zero, 0, 2^b - 1).

    desc_act=True: a seeded random permutation of the K inputs plays GPTQ's processing order; the group of input k is
    (position of k in it) // G, so g_idx is non-monotonic; qweight rows stay in original input order (spec 2.5).
    group_size -1 means one group (G = K). Groups are ceil(K/G) (the last may be short).

    min_zero: lower clamp of the asymmetric zero. Default: 1 for sym=False with v1 ("gptq"), so the stored zero - 1
    never underflows (honest: the quantizer simply never picks zero 0; q is clamped accordingly), else 0.
    Pass min_zero=0 with v1 to produce the real lossy underflow case (see pack_gptq for what `dequantized` means then).
    Returns (dict(qweight int32 [K*b/32, N], qzeros int32 [groups, N*b/32], scales fp16 [groups, N], g_idx int32 [K]),
    dequantized [N, K] float32).
    """
    w = _as_weight(w)
    n, k = w.shape
    _check_gptq_shapes(k, n, bits, checkpoint_format)
    g = _group(k, group_size)
    ngroups = math.ceil(k / g)
    if desc_act:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.argsort(perm) // g          # position of k in the processing order, // G
    else:
        g_idx = torch.arange(k) // g
    if min_zero is None:
        min_zero = 1 if (not sym and checkpoint_format == "gptq") else 0
    maxq = 2**bits - 1
    wt = w.T                                       # [K, N]
    codes = torch.zeros(k, n, dtype=torch.int64)
    zeros = torch.zeros(ngroups, n, dtype=torch.int64)
    scales16 = torch.zeros(ngroups, n, dtype=torch.float16)
    for grp in range(ngroups):
        rows = (g_idx == grp).nonzero().flatten()
        x = wt[rows]
        xmin = x.amin(dim=0).clamp(max=0)
        xmax = x.amax(dim=0).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        flat = (xmax == xmin)
        xmin = torch.where(flat, -1.0, xmin)
        xmax = torch.where(flat, 1.0, xmax)
        s16 = _fp16_scale((xmax - xmin) / maxq)
        s = s16.float()
        if sym:
            z = torch.full((n,), 2 ** (bits - 1), dtype=torch.float32)
        else:
            z = torch.clamp(torch.round(-xmin / s), min_zero, maxq)
        codes[rows] = torch.clamp(torch.round(x / s) + z, 0, maxq).to(torch.int64)
        zeros[grp] = z.to(torch.int64)
        scales16[grp] = s16
    return pack_gptq(codes, zeros, scales16, g_idx, bits, checkpoint_format)


def _gptq_field(words: list, bits: int, index: int, col: int) -> int:
    """Value `index` along the packed dimension (words[row][col] are uint32 Python ints), spec 2.2 / 2.4 wording."""
    if bits != 3:
        pf = 32 // bits
        return (words[index // pf][col] >> (bits * (index % pf))) & ((1 << bits) - 1)
    base, j = 3 * (index // 32), index % 32
    w0, w1, w2 = words[base][col], words[base + 1][col], words[base + 2][col]
    if j < 10:
        return (w0 >> (3 * j)) & 7
    if j == 10:                                    # low 2 bits at word0 bits 30-31, bit 2 at word1 bit 0
        return ((w0 >> 30) & 3) | ((w1 & 1) << 2)
    if j < 21:
        return (w1 >> (3 * (j - 11) + 1)) & 7
    if j == 21:                                    # low bit at word1 bit 31, bits 1-2 at word2 bits 0-1
        return ((w1 >> 31) & 1) | ((w2 & 3) << 1)
    return (w2 >> (3 * (j - 22) + 2)) & 7


def dequantize_gptq(tensors: dict, bits: int, group_size: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Reference GPTQ unpack: Wt[k, n] = scales[g_idx[k], n] * (q[k, n] - zero(g_idx[k], n)), zero = field + 1 (v1)
    or field (v2). Honours `g_idx` when present; `group_size` (-1 = one group) is used only without one."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}")
    qweight, qzeros = _u32_list(tensors["qweight"]), _u32_list(tensors["qzeros"])
    scale = tensors["scales"].float().tolist()
    n = len(scale[0])
    k = len(qweight) * 32 // bits
    if tensors.get("g_idx") is not None:
        g_idx = tensors["g_idx"].tolist()
    else:
        g = _group(k, group_size)
        g_idx = [kk // g for kk in range(k)]
    offset = 1 if checkpoint_format == "gptq" else 0
    # qzeros is packed along N: transpose the list of words so _gptq_field walks rows = packed dim
    qzeros_t = [list(col) for col in zip(*qzeros)]
    zero = [[_gptq_field(qzeros_t, bits, col, grp) + offset for col in range(n)] for grp in range(len(scale))]
    out = [[0.0] * k for _ in range(n)]
    for kk in range(k):
        grp = g_idx[kk]
        for col in range(n):
            out[col][kk] = float(_gptq_field(qweight, bits, kk, col) - zero[grp][col]) * scale[grp][col]
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# SqueezeLLM (formats.md section 3)


def pack_squeezellm(indices: torch.Tensor, lookup_table: torch.Tensor, lut_dtype: torch.dtype = torch.float16):
    """Pack LUT indices `indices` [N, K] in [0, 15] with a per-output-channel `lookup_table` [N, 16].

    The table is rounded to fp16 (vLLM computes in params_dtype fp16) and stored as `lut_dtype` (fp16, or fp32 like the
    original SqueezeLLM files: same values either way). qweight: 4-bit indices packed along K sequentially.
    Returns (dict(qweight int32 [K/8, N], lookup_table [N, 16]), dequantized [N, K] float32).
    """
    indices = indices.to(torch.int64)
    n, k = indices.shape
    if k % 8:
        raise ValueError(f"SqueezeLLM needs K % 8 == 0 (K={k})")
    if tuple(lookup_table.shape) != (n, 16):
        raise ValueError(f"lookup_table must be [N, 16] = [{n}, 16]")
    if indices.min() < 0 or indices.max() > 15:
        raise ValueError("indices must be in [0, 15]")
    lut16 = lookup_table.to(torch.float16)
    deq = torch.gather(lut16.float(), 1, indices)
    tensors = {"qweight": _pack_bitstream_rows(indices.T, 4), "lookup_table": lut16.to(lut_dtype).contiguous()}
    return tensors, deq


def quantize_squeezellm(w: torch.Tensor, lut_dtype: torch.dtype = torch.float16, iters: int = 6):
    """Dense SqueezeLLM-style 4-bit quantization: a 16-entry non-uniform LUT per output channel, initialised at the
    row's quantiles i/15 (its min and max included), refined by `iters` deterministic Lloyd (1-D k-means) steps and
    rounded to fp16; each weight takes the index of its nearest entry.
    Returns (dict(qweight int32 [K/8, N], lookup_table [N, 16]), dequantized [N, K] float32)."""
    w = _as_weight(w)
    n, k = w.shape
    if k % 8:
        raise ValueError(f"SqueezeLLM needs K % 8 == 0 (K={k})")
    lut = torch.quantile(w, torch.linspace(0, 1, 16), dim=1).T.contiguous()  # [N, 16], min and max included
    for _ in range(iters):
        idx = (w[:, :, None] - lut[:, None, :]).abs().argmin(dim=2)
        onehot = torch.nn.functional.one_hot(idx, 16).to(torch.float32)          # [N, K, 16]
        count = onehot.sum(dim=1)
        mean = torch.einsum("nk,nkc->nc", w, onehot) / count.clamp(min=1)
        lut = torch.where(count > 0, mean, lut)
    lut = torch.sort(lut.to(torch.float16).float(), dim=1).values
    idx = (w[:, :, None] - lut[:, None, :]).abs().argmin(dim=2)
    return pack_squeezellm(idx, lut, lut_dtype)


def dequantize_squeezellm(tensors: dict) -> torch.Tensor:
    """Reference SqueezeLLM unpack: W[n, k] = lookup_table[n, (qweight[k // 8, n] >> 4*(k % 8)) & 0xF]."""
    qweight = _u32_list(tensors["qweight"])
    lut = tensors["lookup_table"].to(torch.float16).float().tolist()
    n, k = len(lut), len(qweight) * 8
    return torch.tensor([[lut[col][(qweight[kk // 8][col] >> (4 * (kk % 8))) & 0xF] for kk in range(k)]
                         for col in range(n)], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_COMMON_KW = {"projections": LINEAR_PROJECTIONS, "unquantized_dtype": None}
_METHOD_KW = {
    "awq": {"group_size": 32, "legacy_config_file": False},
    "gptq": {"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "checkpoint_format": "gptq", "seed": 0,
             "min_zero": None, "legacy_config_file": False},
    "squeezellm": {"lut_dtype": torch.float16},
}


def _shards(ckpt_dir: str) -> list:
    names = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no .safetensors file in {ckpt_dir}")
    return names


def _read_shard(path: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})


def _write_shard(path: str, tensors: dict, metadata: dict):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt", **metadata})


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def load_checkpoint_tensors(ckpt_dir: str) -> dict:
    """Every tensor of every safetensors file in `ckpt_dir`, by name."""
    out = {}
    for shard in _shards(ckpt_dir):
        out.update(_read_shard(os.path.join(ckpt_dir, shard))[0])
    return out


def write_quantized_checkpoint(src_dir: str, dst_dir: str, method: str, **kwargs) -> dict:
    """Copy the HF checkpoint `src_dir` to `dst_dir` with every decoder-layer linear projection quantized.

    method "awq": group_size=32, legacy_config_file=False (True: llm-awq `quant_config.json` instead of
      config.json:quantization_config).
    method "gptq": bits=4, group_size=32, sym=True, desc_act=False, checkpoint_format="gptq" ("gptq_v2"), seed=0
      (act-order permutations derive from it, see act_order_seed: q/k/v share one g_idx, gate/up share one),
      min_zero=None (see quantize_gptq),
      legacy_config_file=False (True: AutoGPTQ `quantize_config.json` and no quantization_config in config.json).
    method "squeezellm": lut_dtype=torch.float16; config is `quant_config.json` = {"wbits": 4}.
    All methods: projections=LINEAR_PROJECTIONS (which projection names to quantize); unquantized_dtype=None (keep
      the other tensors as they are; e.g. torch.float16 casts every floating non-quantized tensor and sets
      config.json "dtype", and the returned dict then also holds those tensors, as float32, for an exact reference).

    `<prefix>.weight` becomes `<prefix>.qweight/.qzeros/.scales[/.g_idx]` (squeezellm: `.qweight/.lookup_table`);
    biases, embeddings, norms and lm_head are copied. Returns {`<prefix>.weight`: dequantized float32 [N, K]} for
    every replaced projection (load it into the transformers model with reference_model()).
    """
    if method not in _METHOD_KW:
        raise ValueError(f"method must be one of {sorted(_METHOD_KW)}, got {method!r}")
    unknown = set(kwargs) - set(_METHOD_KW[method]) - set(_COMMON_KW)
    if unknown:
        raise TypeError(f"unexpected arguments for {method}: {sorted(unknown)}")
    opts = {**_COMMON_KW, **_METHOD_KW[method], **kwargs}
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        raise ValueError("dst_dir must differ from src_dir")
    os.makedirs(dst_dir, exist_ok=True)

    index_name = "model.safetensors.index.json"
    for entry in os.listdir(src_dir):
        if entry.endswith(".safetensors") or entry in ("config.json", index_name):
            continue
        src, dst = os.path.join(src_dir, entry), os.path.join(dst_dir, entry)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    for stale in ("quantize_config.json", "quant_config.json"):  # only the config this call writes may exist
        if os.path.exists(os.path.join(dst_dir, stale)) and not os.path.exists(os.path.join(src_dir, stale)):
            os.remove(os.path.join(dst_dir, stale))

    reference, weight_map, quantized = {}, {}, 0
    for shard in _shards(src_dir):
        tensors, metadata = _read_shard(os.path.join(src_dir, shard))
        out = {}
        for name, t in tensors.items():
            m = _PROJ_RE.match(name)
            if m and m.group("proj") in opts["projections"]:
                prefix = m.group("prefix")
                q, deq = _quantize_one(method, t, prefix, opts)
                for suffix, qt in q.items():
                    out[f"{prefix}.{suffix}"] = qt
                reference[name] = deq
                quantized += 1
            else:
                if opts["unquantized_dtype"] is not None and t.is_floating_point():
                    t = t.to(opts["unquantized_dtype"])
                    reference[name] = t.float()
                out[name] = t
        _write_shard(os.path.join(dst_dir, shard), out, metadata)
        weight_map.update(dict.fromkeys(out, shard))
    if not quantized:
        raise ValueError(f"no decoder linear projection found in {src_dir}")
    if os.path.exists(os.path.join(src_dir, index_name)):
        index = _read_json(os.path.join(src_dir, index_name))
        index["weight_map"] = dict(sorted(weight_map.items()))
        _write_json(os.path.join(dst_dir, index_name), index)

    config = _read_json(os.path.join(src_dir, "config.json"))
    if opts["unquantized_dtype"] is not None:
        dtype_name = str(opts["unquantized_dtype"]).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
    side_file, side_config = _quant_configs(method, opts, config)
    _write_json(os.path.join(dst_dir, "config.json"), config)
    if side_file:
        _write_json(os.path.join(dst_dir, side_file), side_config)
    return reference


# Projections that read the same input share GPTQ's Hessian, hence one act-order permutation (one g_idx).
_SHARED_INPUT = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def act_order_seed(seed: int, prefix: str) -> int:
    """The desc_act permutation seed write_quantized_checkpoint uses for `prefix` (e.g.
    "model.layers.0.self_attn.k_proj"): q/k/v of a layer share one, gate/up share one, every other projection and
    every layer gets its own, as in real GPTQ checkpoints (projections reading the same input have the same H)."""
    head, _, proj = prefix.rpartition(".")
    key = f"{head}.{_SHARED_INPUT.get(proj, proj)}"
    return (seed + zlib.crc32(key.encode())) % 2**31


def _quantize_one(method: str, weight: torch.Tensor, prefix: str, opts: dict):
    if method == "awq":
        return quantize_awq(weight.float(), group_size=opts["group_size"])
    if method == "gptq":
        return quantize_gptq(weight.float(), opts["bits"], group_size=opts["group_size"], sym=opts["sym"],
                             desc_act=opts["desc_act"], checkpoint_format=opts["checkpoint_format"],
                             seed=act_order_seed(opts["seed"], prefix), min_zero=opts["min_zero"])
    return quantize_squeezellm(weight.float(), lut_dtype=opts["lut_dtype"])


def _quant_configs(method: str, opts: dict, config: dict):
    """Fill config.json's quantization_config (in place) or return (side file name, its content)."""
    if method == "squeezellm":
        return "quant_config.json", {"wbits": 4}
    if method == "awq":
        if opts["legacy_config_file"]:
            return "quant_config.json", {"zero_point": True, "q_group_size": opts["group_size"], "w_bit": 4,
                                         "version": "GEMM"}
        config["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": opts["group_size"],
                                         "bits": 4, "version": "gemm", "modules_to_not_convert": None}
        return None, None
    fields = {"bits": opts["bits"], "group_size": opts["group_size"], "damp_percent": 0.01,
              "desc_act": opts["desc_act"], "static_groups": False, "sym": opts["sym"], "true_sequential": True,
              "quant_method": "gptq", "checkpoint_format": opts["checkpoint_format"]}
    if opts["legacy_config_file"]:
        return "quantize_config.json", {**fields, "model_name_or_path": None, "model_file_base_name": "model"}
    config["quantization_config"] = {**fields, "lm_head": False}
    return None, None


def reference_model(src_model, dequantized: dict):
    """A float32 deepcopy of the transformers model `src_model` with the `dequantized` weights loaded (eval mode)."""
    model = copy.deepcopy(src_model).float().eval()
    state = {name: t.float() for name, t in dequantized.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"names not in the model: {result.unexpected_keys}")
    return model


def reference_dequantize_checkpoint(ckpt_dir: str) -> dict:
    """Re-read a quantized checkpoint from disk with the reference unpackers, configured from its own config file(s)
    the way vLLM reads them (bits from bits/w_bit/wbits, group from group_size/q_group_size, checkpoint_format).
    Returns {`<prefix>.weight`: float32 [N, K]} for every quantized projection."""
    method, cfg = _read_quant_config(ckpt_dir)
    tensors = load_checkpoint_tensors(ckpt_dir)
    out = {}
    for name in sorted(tensors):
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        parts = {s: tensors[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx", "lookup_table")
                 if f"{prefix}.{s}" in tensors}
        if method == "awq":
            out[f"{prefix}.weight"] = dequantize_awq(parts, cfg.get("group_size", cfg.get("q_group_size")))
        elif method == "gptq":
            out[f"{prefix}.weight"] = dequantize_gptq(parts, cfg.get("bits", cfg.get("w_bit")),
                                                      cfg.get("group_size", cfg.get("q_group_size", -1)),
                                                      cfg.get("checkpoint_format", "gptq"))
        elif method == "squeezellm":
            out[f"{prefix}.weight"] = dequantize_squeezellm(parts)
        else:
            raise ValueError(f"unknown quantization method {method!r} in {ckpt_dir}")
    return out


def quant_config_location(ckpt_dir: str):
    """(path of the file holding the quantization config, key in it or None for the whole file)."""
    config_path = os.path.join(ckpt_dir, "config.json")
    if os.path.exists(config_path) and "quantization_config" in _read_json(config_path):
        return config_path, "quantization_config"
    for side in ("quantize_config.json", "quant_config.json"):
        if os.path.exists(os.path.join(ckpt_dir, side)):
            return os.path.join(ckpt_dir, side), None
    raise FileNotFoundError(f"no quantization config in {ckpt_dir}")


def _read_quant_config(ckpt_dir: str):
    path, key = quant_config_location(ckpt_dir)
    cfg = _read_json(path)
    cfg = cfg[key] if key else cfg
    method = cfg.get("quant_method")
    if method is None:
        if "wbits" in cfg:
            method = "squeezellm"
        elif os.path.basename(path) == "quant_config.json":
            method = "awq"
        else:
            method = "gptq"
    return method, cfg


def set_quant_field(dst_dir: str, key: str, value) -> str:
    """Edit one field of the quantization config wherever it lives (config.json:quantization_config,
    quantize_config.json or quant_config.json); value REMOVE deletes the key. Returns the edited file's path."""
    path, section = quant_config_location(dst_dir)
    whole = _read_json(path)
    cfg = whole[section] if section else whole
    if value is REMOVE:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    _write_json(path, whole)
    return path


def replace_tensor(dst_dir: str, name: str, tensor) -> None:
    """Rewrite the safetensors file that holds `name` with `tensor` in its place (None drops it)."""
    for shard in _shards(dst_dir):
        path = os.path.join(dst_dir, shard)
        tensors, metadata = _read_shard(path)
        if name not in tensors:
            continue
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
        _write_shard(path, tensors, metadata)
        index_path = os.path.join(dst_dir, "model.safetensors.index.json")
        if tensor is None and os.path.exists(index_path):
            index = _read_json(index_path)
            index["weight_map"].pop(name, None)
            _write_json(index_path, index)
        return
    raise KeyError(f"{name} is in no safetensors file of {dst_dir}")


def truncate_tensor(dst_dir: str, name: str, length: int | None = None) -> tuple:
    """Cut tensor `name` short along dim 0 (to `length`, default half of it). Returns its new shape."""
    t = load_checkpoint_tensors(dst_dir)[name]
    length = t.shape[0] // 2 if length is None else length
    if not 0 <= length < t.shape[0]:
        raise ValueError(f"length {length} does not shorten dim 0 of size {t.shape[0]}")
    replace_tensor(dst_dir, name, t[:length].clone())
    return tuple(t[:length].shape)


def drop_tensor(dst_dir: str, name: str) -> None:
    """Remove tensor `name` from the checkpoint (for missing-tensor error tests)."""
    replace_tensor(dst_dir, name, None)
