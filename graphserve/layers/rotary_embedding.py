"""Rotary position embedding (RoPE) and its HF scaling variants: linear, dynamic, yarn, llama3, longrope.

The frequencies are computed in float64 from the formulas of transformers' `modeling_rope_utils` and stored
as one float32 `cos_sin_cache [cache_len, rotary_dim]` per module (cos in the first half, sin in the second),
with the variant's attention factor (yarn mscale, longrope scaling) already multiplied in.

Position-dependent variants are baked into the cache per position, so the op never branches on the batch:
- dynamic (NTK): position p uses the frequencies HF computes for seq_len = max(p + 1, max_position), i.e.
  plain RoPE below max_position and the frequencies HF recomputes when p is the newest token. This equals HF
  for every prompt up to max_position and for token-by-token decoding past it; HF's prefill of a single
  prompt longer than max_position rotates all its tokens with the frequencies of the prompt's length instead.
  (vLLM instead uses one static base for seq_len = max_position * factor, which differs from HF everywhere.)
- longrope: positions < original_max_position_embeddings use the short factors, later ones the long
  factors (the same per-position rule as HF's token-by-token decoding).
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from graphserve.ops import rotary as rotary_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_NEEDS_ORIGINAL_MAX = ("yarn", "llama3", "longrope")
# Built caches shared by all layers with the same parameters on the same device (freed with the last user).
_CACHES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _normalize_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy keyed by "rope_type" (legacy "type" accepted), without the base/partial keys; None for plain RoPE."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None
    scaling["rope_type"] = rope_type
    return scaling


def _rope_dict(hf_config: Any, layer_type: str | None) -> dict[str, Any]:
    """The config's RoPE dict: transformers 5 `rope_parameters` (maybe per layer type) or 4.x `rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
        if nested:
            if layer_type is None or layer_type not in nested:
                raise ValueError(f"rope_parameters is per layer type {sorted(nested)}; pass layer_type")
            return dict(nested[layer_type])
        return dict(params)
    return dict(getattr(hf_config, "rope_scaling", None) or {})


def get_rope_parameters(hf_config: Any, layer_type: str | None = None) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a transformers 5 or 4.x config; rope_scaling is None for plain RoPE.

    The returned scaling dict always uses the key "rope_type". As in HF, a top-level
    `original_max_position_embeddings` (Phi-3) takes priority for the variants that use it.
    """
    params = _rope_dict(hf_config, layer_type)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = getattr(hf_config, "default_theta", 10000.0)
    scaling = _normalize_scaling(params)
    if scaling is not None and scaling["rope_type"] in _NEEDS_ORIGINAL_MAX:
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
    return float(theta), scaling


def get_partial_rotary_factor(hf_config: Any, layer_type: str | None = None) -> float:
    """Fraction of head_dim that rotates (transformers 5 keeps it in rope_parameters; GPT-NeoX calls it rotary_pct)."""
    factor = _rope_dict(hf_config, layer_type).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(hf_config, "partial_rotary_factor", None) or getattr(hf_config, "rotary_pct", None)
    return float(factor) if factor is not None else 1.0


def _plain_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:  # [rotary_dim // 2] float64
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    inv_freq: torch.Tensor, base: float, rotary_dim: int, max_position: int, s: dict
) -> tuple[torch.Tensor, float]:
    """Blend interpolated (low-frequency) and original (high-frequency) dims with a linear ramp."""
    original = s.get("original_max_position_embeddings", max_position)
    factor = s.get("factor") or max_position / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # weight of the original frequency
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, max_position: int, s: dict) -> torch.Tensor:
    """Keep high frequencies, divide low ones by factor, interpolate smoothly in between."""
    factor, low_ff, high_ff = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s.get("original_max_position_embeddings", max_position)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low_ff, inv_freq / factor, smoothed)
    return torch.where(wavelen < original / high_ff, inv_freq, out)


def compute_inv_freq(
    rotary_dim: int, max_position: int, base: float, rope_scaling: dict | None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float64, attention_factor) as HF's ROPE_INIT_FUNCTIONS(config, seq_len) gives.

    `seq_len` matters only for dynamic and longrope (None = at most max_position / the original length).
    """
    s = _normalize_scaling(rope_scaling) or {"rope_type": "default"}
    rope_type = s["rope_type"]
    inv_freq = _plain_inv_freq(base, rotary_dim)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / s["factor"], 1.0
    if rope_type == "dynamic":
        seq = torch.tensor([float(max(seq_len or 0, max_position))], dtype=torch.float64)
        return _dynamic_inv_freq(base, rotary_dim, max_position, s["factor"], seq)[0], 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, base, rotary_dim, max_position, s)
    if rope_type == "llama3":
        return _llama3(inv_freq, max_position, s), 1.0
    if rope_type == "longrope":
        short, long, attention_factor, original = _longrope_parts(inv_freq, max_position, s)
        return (long if seq_len and seq_len > original else short), attention_factor
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")


def _dynamic_inv_freq(
    base: float, rotary_dim: int, max_position: int, factor: float, seq_lens: torch.Tensor  # [n] float64, >= L
) -> torch.Tensor:  # [n, rotary_dim // 2] float64
    """NTK-aware base growth: base' = base * (factor * seq_len / L - (factor - 1)) ** (d / (d - 2))."""
    bases = base * (factor * seq_lens / max_position - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / bases.unsqueeze(1) ** exponent


def _longrope_parts(
    inv_freq: torch.Tensor, max_position: int, s: dict
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(short inv_freq, long inv_freq, attention_factor, original_max_position_embeddings)."""
    original = s.get("original_max_position_embeddings", max_position)
    factor = s.get("factor") or max_position / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = inv_freq / torch.tensor(s["short_factor"], dtype=torch.float64)
    long = inv_freq / torch.tensor(s["long_factor"], dtype=torch.float64)
    return short, long, float(attention_factor), original


def rope_cache_len(max_position: int, rope_scaling: dict | None) -> int:
    """Number of positions the cos/sin cache covers (vLLM's choice per variant)."""
    s = _normalize_scaling(rope_scaling)
    if s is None:
        return max_position
    if s["rope_type"] in ("linear", "dynamic"):
        return int(max_position * s["factor"])
    if s["rope_type"] == "yarn":
        original = s.get("original_max_position_embeddings", max_position)
        return max(max_position, int(original * (s.get("factor") or max_position / original)))
    return max_position


def compute_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float, rope_scaling: dict | None
) -> torch.Tensor:  # [cache_len, rotary_dim] float32 on CPU
    """cos and sin (times the attention factor) for every position, computed in float64."""
    s = _normalize_scaling(rope_scaling) or {"rope_type": "default"}
    cache_len = rope_cache_len(max_position, rope_scaling)
    positions = torch.arange(cache_len, dtype=torch.float64)
    if s["rope_type"] == "dynamic":
        seq_lens = positions.add(1).clamp(min=max_position)
        inv_freq, attention_factor = _dynamic_inv_freq(base, rotary_dim, max_position, s["factor"], seq_lens), 1.0
    elif s["rope_type"] == "longrope":
        short, long, attention_factor, original = _longrope_parts(_plain_inv_freq(base, rotary_dim), max_position, s)
        inv_freq = torch.where(positions.unsqueeze(1) < original, short, long)
    else:
        inv_freq, attention_factor = compute_inv_freq(rotary_dim, max_position, base, s)
    angles = positions.unsqueeze(1) * inv_freq
    return (torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_factor).float()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class RotaryEmbedding(nn.Module):
    """Applies RoPE in place to packed query/key with a precomputed cos/sin cache."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position_embeddings: int,
        base: float,
        is_neox_style: bool = True,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_size ({head_size}), got {rotary_dim}")
        self.rope_scaling = _normalize_scaling(rope_scaling)
        rope_type = self.rope_scaling["rope_type"] if self.rope_scaling else "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.is_neox_style = is_neox_style
        device = torch.empty(0).device  # honours `with torch.device("meta")` during model construction
        self.register_buffer("cos_sin_cache", self._build_cache(device), persistent=False)

    def _build_cache(self, device: torch.device) -> torch.Tensor:  # [cache_len, rotary_dim] float32
        if device.type == "meta":
            shape = (rope_cache_len(self.max_position_embeddings, self.rope_scaling), self.rotary_dim)
            return torch.empty(shape, dtype=torch.float32, device=device)
        key = (self.rotary_dim, self.max_position_embeddings, self.base, _freeze(self.rope_scaling), str(device))
        cache = _CACHES.get(key)
        if cache is None:
            args = (self.rotary_dim, self.max_position_embeddings, self.base, self.rope_scaling)
            cache = compute_cos_sin_cache(*args).to(device)
            _CACHES[key] = cache
        return cache

    def init_buffers(self) -> None:
        """Recompute the cos/sin cache on the buffer's current device (after meta build + `to_empty`)."""
        self.cos_sin_cache = self._build_cache(self.cos_sin_cache.device)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        query: torch.Tensor,  # [num_tokens, num_heads * head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads * head_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query and key in place (like vLLM) and return them."""
        rotary_ops.rotary_embedding(positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox_style)
        return query, key

    def extra_repr(self) -> str:
        return (
            f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, max_position={self.max_position_embeddings}, "
            f"base={self.base}, is_neox_style={self.is_neox_style}, rope_scaling={self.rope_scaling}"
        )


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict | None = None,
    is_neox_style: bool = True,
    partial_rotary_factor: float = 1.0,
) -> RotaryEmbedding:
    """A RotaryEmbedding for a model; `rotary_dim` is scaled by `partial_rotary_factor` (as in vLLM)."""
    if partial_rotary_factor < 1.0:
        rotary_dim = int(rotary_dim * partial_rotary_factor)
    return RotaryEmbedding(head_size, rotary_dim, max_position, base, is_neox_style, rope_scaling)
