"""Tiny checkpoints built offline (no hub): random HF weights plus a byte-level BPE tokenizer trained in memory.

Shared by the test suite (the transformers oracle) and the host-overhead benchmarks. The tokenizer is the
benchmark tokenizer of `graphserve.benchmarks.tokenizer`.
"""
from __future__ import annotations

from graphserve.benchmarks.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TINY_CONFIG", "build_tokenizer", "tiny_hf_config",
           "write_tiny_checkpoint"]

TINY_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1,
)


def tiny_hf_config(arch: str, **overrides):
    """Configs of the supported families, small enough to run in milliseconds."""
    from transformers import (
        FalconConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GPTNeoXConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
        Starcoder2Config,
    )

    base = {**TINY_CONFIG, **overrides}
    return {
        "llama": lambda: LlamaConfig(**base),
        "llama3_rope": lambda: LlamaConfig(**base, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "mistral": lambda: MistralConfig(**base, sliding_window=12),
        "qwen2": lambda: Qwen2Config(**base),
        "qwen3": lambda: Qwen3Config(**base, head_dim=32),
        "granite": lambda: GraniteConfig(**base, embedding_multiplier=3.0, attention_multiplier=0.05,
                                         residual_multiplier=0.4, logits_scaling=2.5),
        # A partial rotary factor (Phi-4-mini style); fused qkv / gate_up tensors in the checkpoint.
        "phi3": lambda: Phi3Config(**base, pad_token_id=0, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        # LongRoPE (Phi-3-mini-128k style), prompts below original_max_position_embeddings.
        "phi3_longrope": lambda: Phi3Config(**base, pad_token_id=0, original_max_position_embeddings=24,
                                            rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [2.0 + 0.1 * i for i in range(8)]}),
        # LayerNorms, biases, a GELU MLP and a sliding window of 12 tokens.
        "starcoder2": lambda: Starcoder2Config(**base, sliding_window=12, use_bias=True, norm_epsilon=1e-5),
        "olmo2": lambda: Olmo2Config(**base),
        # GeGLU, (1 + w) norms, embedding normalizer, head_dim 32 != hidden / heads, tied head.
        "gemma": lambda: GemmaConfig(**base, head_dim=32),
        # Head-interleaved fused qkv, partial rotary, parallel residual (gpt_neox_seq: the sequential one).
        "gpt_neox": lambda: GPTNeoXConfig(**_mha(base), rotary_pct=0.25, hidden_act="gelu"),
        "gpt_neox_seq": lambda: GPTNeoXConfig(**_mha(base), rotary_pct=0.5, use_parallel_residual=False),
        # Falcon-7B style (multi-query, one shared norm, parallel block, no biases, tied head) and the new
        # architecture (grouped KV heads, ln_attn / ln_mlp, biases); falcon_seq: the sequential block.
        "falcon": lambda: FalconConfig(**_mha(base), multi_query=True, parallel_attn=True),
        "falcon_new": lambda: FalconConfig(**_mha(base), new_decoder_architecture=True, num_kv_heads=2, bias=True,
                                           tie_word_embeddings=False),
        "falcon_seq": lambda: FalconConfig(**_mha(base), multi_query=False, parallel_attn=False, bias=True),
        # Attention and final logit soft-caps small enough to bite, alternating window-8 and global layers.
        "gemma2": lambda: Gemma2Config(**{**base, "num_hidden_layers": 3}, head_dim=32, sliding_window=8,
                                       query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                       final_logit_softcapping=3.0),
        # Local (window 8) and global layers with their own RoPE, per-head q/k norms, four norms per layer,
        # query_pre_attn_scalar and a final logit soft-cap.
        "gemma3": lambda: Gemma3TextConfig(**{**base, "num_hidden_layers": 3}, head_dim=32, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                           query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                                           rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}),
        # Enough experts and top-k that routing differs per token; qwen2_moe: a dense layer after a sparse one.
        "mixtral": lambda: MixtralConfig(**base, num_local_experts=5, num_experts_per_tok=2),
        "qwen2_moe": lambda: Qwen2MoeConfig(**base, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=48,
                                            shared_expert_intermediate_size=96, mlp_only_layers=[1]),
        "qwen3_moe": lambda: Qwen3MoeConfig(**base, num_experts=7, num_experts_per_tok=3, moe_intermediate_size=32,
                                            norm_topk_prob=True, head_dim=32),
    }[arch]()


def write_tiny_checkpoint(path: str, arch: str = "llama", weights: bool = True, **overrides):
    """Save config (+ random weights unless weights=False) and tokenizer to `path`; returns the HF model or None."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **overrides)
    model = None
    if weights:
        torch.manual_seed(sum(map(ord, arch)))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.save_pretrained(path)
    else:
        config.save_pretrained(path)
    build_tokenizer(config.vocab_size).save_pretrained(path)
    return model


def _mha(config: dict) -> dict:
    """The config without num_key_value_heads (GPT-NeoX has one KV head per query head)."""
    return {k: v for k, v in config.items() if k != "num_key_value_heads"}
