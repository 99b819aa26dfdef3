"""Tiny checkpoints built offline (no hub): random HF weights plus a byte-level BPE tokenizer trained in memory.

Shared by the test suite (the transformers oracle) and the host-overhead benchmarks.
"""
from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Continuous batching shares every engine step between many requests.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Café, naïve, jalapeño, 中文字符, emoji 🙂 and other multi-byte text.",
    "def add(a, b):\n    return a + b\n",
] * 20

TINY_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1,
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in memory, with ChatML-style special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_hf_config(arch: str, **overrides):
    """Configs of the supported families, small enough to run in milliseconds."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = {**TINY_CONFIG, **overrides}
    return {
        "llama": lambda: LlamaConfig(**base),
        "llama3_rope": lambda: LlamaConfig(**base, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "mistral": lambda: MistralConfig(**base, sliding_window=12),
        "qwen2": lambda: Qwen2Config(**base),
        "qwen3": lambda: Qwen3Config(**base, head_dim=32),
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
