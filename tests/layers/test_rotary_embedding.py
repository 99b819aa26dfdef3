"""RoPE scaling variants vs a float64 re-implementation of the formulas and vs transformers itself."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from graphserve.layers.rotary_embedding import (
    compute_cos_sin_cache,
    compute_inv_freq,
    get_partial_rotary_factor,
    get_rope,
    get_rope_parameters,
)

LLAMA31 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
LONGROPE_D = 16  # longrope needs one factor per frequency, so it gets a small head
LONGROPE = {
    "rope_type": "longrope", "original_max_position_embeddings": 64,
    "short_factor": [1.0 + 0.1 * i for i in range(LONGROPE_D // 2)],
    "long_factor": [2.0 + 0.5 * i for i in range(LONGROPE_D // 2)],
}


def _plain(base, d):
    return [base ** (-2 * i / d) for i in range(d // 2)]


def _llama3_f64(base, d):
    out = []
    for f in _plain(base, d):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            out.append(f)
        elif wavelen > 8192 / 1:
            out.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - s) * f / 8 + s * f)
    return out


def _yarn_f64(base, d, factor, original):
    def corr(rot):
        return d * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    out = []
    for i, f in enumerate(_plain(base, d)):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * ramp + f * (1 - ramp))
    return out, 0.1 * math.log(factor) + 1


def _dynamic_f64(base, d, factor, max_pos, seq_len):
    new_base = base * (factor * max(seq_len, max_pos) / max_pos - (factor - 1)) ** (d / (d - 2))
    return _plain(new_base, d)


CASES = [
    # (name, d, max_position, base, scaling, seq_len, expected inv_freq, expected attention factor)
    ("llama3.1", 128, 131072, 500000.0, LLAMA31, None, _llama3_f64(500000.0, 128), 1.0),
    ("yarn4", 128, 32768, 1e6, QWEN_YARN, None, *_yarn_f64(1e6, 128, 4.0, 32768)),
    ("linear2", 64, 4096, 10000.0, {"type": "linear", "factor": 2.0}, None, [f / 2 for f in _plain(1e4, 64)], 1.0),
    ("dynamic-short", 64, 4096, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 100, _plain(1e4, 64), 1.0),
    ("dynamic-long", 64, 4096, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 3 * 4096,
     _dynamic_f64(1e4, 64, 2.0, 4096, 3 * 4096), 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_inv_freq_matches_float64_formulas(case):
    _, d, max_pos, base, scaling, seq_len, expected, attention_factor = case
    inv_freq, factor = compute_inv_freq(d, max_pos, base, scaling, seq_len=seq_len)
    torch.testing.assert_close(inv_freq, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert factor == pytest.approx(attention_factor, rel=1e-12)


def test_llama3_known_thresholds():
    inv_freq, _ = compute_inv_freq(128, 131072, 500000.0, LLAMA31)
    plain = torch.tensor(_plain(500000.0, 128), dtype=torch.float64)
    wavelen = 2 * math.pi / plain
    torch.testing.assert_close(inv_freq[wavelen < 2048], plain[wavelen < 2048], rtol=1e-12, atol=0)
    torch.testing.assert_close(inv_freq[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-12, atol=0)


def _hf_config(d, max_pos, base, scaling):
    params = dict(scaling or {"rope_type": "default"}, rope_theta=base)
    params["rope_type"] = params.pop("type", params.get("rope_type"))
    return LlamaConfig(
        hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=max_pos, rope_parameters=params
    )


HF_CASES = CASES + [("longrope-short", LONGROPE_D, 256, 1e4, LONGROPE, 10, None, None),
                    ("longrope-long", LONGROPE_D, 256, 1e4, LONGROPE, 100, None, None)]


@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_inv_freq_matches_transformers_init_functions(case):
    _, d, max_pos, base, scaling, seq_len, _, _ = case
    config = _hf_config(d, max_pos, base, scaling)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu", seq_len=seq_len)
    inv_freq, factor = compute_inv_freq(d, max_pos, base, scaling, seq_len=seq_len)
    torch.testing.assert_close(inv_freq.float(), hf_inv_freq, rtol=2e-6, atol=0)
    assert factor == pytest.approx(hf_factor, rel=1e-6)


def test_cos_sin_cache_is_cos_and_sin_of_position_times_inv_freq():
    inv_freq, mscale = compute_inv_freq(128, 32768, 1e6, QWEN_YARN)
    cache = compute_cos_sin_cache(128, 32768, 1e6, QWEN_YARN)
    assert cache.shape == (4 * 32768, 128) and cache.dtype == torch.float32
    for pos in (0, 1, 4097, 4 * 32768 - 1):
        angles = pos * inv_freq
        expected = torch.cat((angles.cos(), angles.sin())) * mscale
        torch.testing.assert_close(cache[pos].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,scaling,max_pos,positions", [
    ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, 64, [0, 5, 63, 64, 65, 100, 127]),
    ("longrope", LONGROPE, 256, [0, 10, 63, 64, 65, 200]),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, [0, 7, 255]),
])
def test_cache_matches_hf_token_by_token_decoding(name, scaling, max_pos, positions):
    """Position p must get what HF computes when p is the newest token (dynamic/longrope recompute then)."""
    d = LONGROPE_D
    hf = LlamaRotaryEmbedding(_hf_config(d, max_pos, 10000.0, scaling))
    rope = get_rope(d, d, max_pos, 10000.0, scaling)
    x = torch.zeros(1, 1, d)
    for pos in positions:  # increasing, as in decoding
        cos, sin = hf(x, torch.tensor([[pos]]))
        expected = torch.cat((cos[0, 0, : d // 2], sin[0, 0, : d // 2]))
        torch.testing.assert_close(rope.cos_sin_cache[pos], expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "scaling", [None, LLAMA31, {"type": "linear", "factor": 2.0}], ids=["plain", "llama3", "linear"]
)
def test_module_matches_hf_apply_rotary_pos_emb(scaling):
    d, num_heads, num_kv_heads, num_tokens = 64, 4, 2, 9
    max_pos = 131072 if scaling is LLAMA31 else 2048
    rope = get_rope(d, d, max_pos, 500000.0, scaling)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(num_tokens, num_heads * d, generator=g)
    k = torch.randn(num_tokens, num_kv_heads * d, generator=g)
    positions = torch.tensor([0, 1, 2, 3, 100, 1000, 5000, 9000, 20000]) % max_pos
    hf = LlamaRotaryEmbedding(_hf_config(d, max_pos, 500000.0, scaling))
    cos, sin = hf(q, positions.unsqueeze(0))
    hf_q, hf_k = apply_rotary_pos_emb(
        q.view(1, num_tokens, num_heads, d).transpose(1, 2), k.view(1, num_tokens, num_kv_heads, d).transpose(1, 2),
        cos, sin,
    )
    out_q, out_k = rope(positions, q.clone(), k.clone())
    # HF rounds pos * inv_freq in fp32 (error ~ pos * 6e-8); the cache is exact to fp32.
    torch.testing.assert_close(out_q, hf_q.transpose(1, 2).reshape(num_tokens, -1), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(out_k, hf_k.transpose(1, 2).reshape(num_tokens, -1), rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(out_q[:4], hf_q.transpose(1, 2).reshape(num_tokens, -1)[:4], rtol=1e-5, atol=1e-5)


def test_meta_build_then_init_buffers_equals_direct_build():
    direct = get_rope(32, 32, 512, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with torch.device("meta"):
        lazy = get_rope(32, 32, 512, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    assert lazy.cos_sin_cache.is_meta and lazy.cos_sin_cache.shape == (1024, 32)
    lazy.to_empty(device="cpu")
    lazy.init_buffers()
    assert torch.equal(lazy.cos_sin_cache, direct.cos_sin_cache)
    assert "cos_sin_cache" not in lazy.state_dict()


def test_partial_rotary_factor_rotates_only_the_first_dims():
    rope = get_rope(16, 16, 64, 10000.0, None, partial_rotary_factor=0.5)
    assert rope.rotary_dim == 8 and rope.cos_sin_cache.shape == (64, 8)
    q, k = torch.randn(3, 32), torch.randn(3, 16)
    q0 = q.clone()
    rope(torch.tensor([1, 2, 3]), q, k)
    heads, heads0 = q.view(3, 2, 16), q0.view(3, 2, 16)
    assert torch.equal(heads[..., 8:], heads0[..., 8:])
    assert not torch.allclose(heads[..., :8], heads0[..., :8])


def test_get_rope_parameters_reads_both_transformers_spellings():
    v5 = LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **{k: v for k, v in LLAMA31.items()}})
    theta, scaling = get_rope_parameters(v5)
    assert theta == 5e5 and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert "rope_theta" not in scaling
    assert get_rope_parameters(LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e5})) == (1e5, None)
    legacy = SimpleNamespace(rope_theta=2e4, rope_scaling={"type": "linear", "factor": 2.0})
    assert get_rope_parameters(legacy) == (2e4, {"factor": 2.0, "rope_type": "linear"})
    assert get_rope_parameters(SimpleNamespace(rope_theta=1e4, rope_scaling=None)) == (1e4, None)
    phi3 = SimpleNamespace(rope_theta=1e4, original_max_position_embeddings=4096,
                           rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})
    assert get_rope_parameters(phi3)[1]["original_max_position_embeddings"] == 4096
    nested = SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert get_rope_parameters(nested, layer_type="sliding_attention") == (1e4, None)
    with pytest.raises(ValueError, match="layer_type"):
        get_rope_parameters(nested)


def test_get_partial_rotary_factor():
    v5 = SimpleNamespace(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.4})
    assert get_partial_rotary_factor(v5) == 0.4
    assert get_partial_rotary_factor(SimpleNamespace(rotary_pct=0.25, rope_theta=1e4)) == 0.25
    assert get_partial_rotary_factor(LlamaConfig()) == 1.0


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(ValueError, match="unsupported rope_type"):
        get_rope(16, 16, 64, 10000.0, {"rope_type": "mrope", "mrope_section": [2, 2]})
