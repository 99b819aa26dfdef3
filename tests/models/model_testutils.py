"""Shared helpers for the model tests: tiny random HF checkpoints and full-prompt logits."""
import torch

from perf.tiny_checkpoint import tiny_hf_config

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6)
# The sliding-window models get a window well below the prompt length, so masking is exercised.
PROMPT_LEN = 20


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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
            # Variants of the model tests; every other family as the suite's shared tiny configs build it.
            config = _configs().get(name, lambda: tiny_hf_config(name, **TINY))()
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

