"""Shared helpers for the model tests: tiny random HF checkpoints and full-prompt logits."""
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6)
# The sliding-window models get a window well below the prompt length, so masking is exercised.
PROMPT_LEN = 20


def _configs():
    from transformers import (
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

    return {
        "llama": lambda: LlamaConfig(**TINY),
        "llama_llama3_rope": lambda: LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "llama_yarn_rope": lambda: LlamaConfig(**TINY, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
        "llama_linear_rope": lambda: LlamaConfig(**TINY, rope_parameters={
            "rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}),
        # Tied embeddings plus the optional Llama biases, in one checkpoint.
        "llama_tied_bias": lambda: LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True,
                                               mlp_bias=True),
        "mistral": lambda: MistralConfig(**TINY, sliding_window=8),
        # Layer 0 full attention, layer 1 sliding (max_window_layers=1).
        "qwen2": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "qwen3": lambda: Qwen3Config(**TINY, head_dim=32),
        "granite": lambda: GraniteConfig(**TINY, embedding_multiplier=3.0, attention_multiplier=0.05,
                                         residual_multiplier=0.4, logits_scaling=2.5),
        # A partial rotary factor (Phi-4-mini style); fused qkv / gate_up tensors in the checkpoint.
        "phi3": lambda: Phi3Config(**TINY, pad_token_id=0, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        # LongRoPE (Phi-3-mini-128k style), prompts below original_max_position_embeddings.
        "phi3_longrope": lambda: Phi3Config(**TINY, pad_token_id=0, original_max_position_embeddings=24,
                                            rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [2.0 + 0.1 * i for i in range(8)]}),
        # LayerNorms, biases, a GELU MLP and a sliding window of 12 tokens.
        "starcoder2": lambda: Starcoder2Config(**TINY, sliding_window=12, use_bias=True, norm_epsilon=1e-5),
        "olmo2": lambda: Olmo2Config(**TINY),
        # GeGLU, (1 + w) norms, embedding normalizer, head_dim 32 != hidden / heads, tied head.
        "gemma": lambda: GemmaConfig(**TINY, head_dim=32),
        # Head-interleaved fused qkv, partial rotary, parallel residual (gpt_neox_seq: the sequential one).
        "gpt_neox": lambda: GPTNeoXConfig(**_mha(TINY), rotary_pct=0.25, hidden_act="gelu"),
        "gpt_neox_seq": lambda: GPTNeoXConfig(**_mha(TINY), rotary_pct=0.5, use_parallel_residual=False),
        # Enough experts and top-k that routing differs per token; qwen2_moe: a dense layer after a sparse one.
        "mixtral": lambda: MixtralConfig(**TINY, num_local_experts=5, num_experts_per_tok=2),
        "qwen2_moe": lambda: Qwen2MoeConfig(**TINY, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=48,
                                            shared_expert_intermediate_size=96, mlp_only_layers=[1]),
        "qwen3_moe": lambda: Qwen3MoeConfig(**TINY, num_experts=7, num_experts_per_tok=3, moe_intermediate_size=32,
                                            norm_topk_prob=True, head_dim=32),
    }


class TinyCheckpoints:
    """Builds each tiny model on first request; returns (saved directory, HF model in fp32)."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._cache = {}

    def __call__(self, name: str):
        if name not in self._cache:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(sum(map(ord, name)))  # stable across processes
            config = _configs()[name]()
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
            model.eval()
            path = self._factory.mktemp(name)
            model.save_pretrained(path)
            self._cache[name] = (str(path), model)
        return self._cache[name]


@torch.no_grad()
def hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-prompt logits [T, V] from transformers."""
    return hf_model(input_ids.unsqueeze(0)).logits[0].float()


@torch.no_grad()
def our_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-prompt logits [T, V] from graphserve (no forward context: plain causal attention)."""
    positions = torch.arange(input_ids.shape[0], device=input_ids.device)
    return model.compute_logits(model(input_ids, positions))


def _mha(config: dict) -> dict:
    """The config without num_key_value_heads (GPT-NeoX has one KV head per query head)."""
    return {k: v for k, v in config.items() if k != "num_key_value_heads"}
