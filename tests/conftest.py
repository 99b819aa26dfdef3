"""Suite-wide fixtures: tiny random checkpoints with a real (trained-on-the-fly) byte-level BPE tokenizer."""
import os

# Must be set before any @triton.jit decorator runs (CPU machines have no GPU; kernels run in the interpreter).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in memory (no hub), with ChatML-style special tokens."""
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


TINY_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1,
)


def tiny_hf_config(arch: str):
    """Configs of the supported families, small enough to run in milliseconds."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": lambda: LlamaConfig(**TINY_CONFIG),
        "llama3_rope": lambda: LlamaConfig(**TINY_CONFIG, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "mistral": lambda: MistralConfig(**TINY_CONFIG, sliding_window=12),
        "qwen2": lambda: Qwen2Config(**TINY_CONFIG),
        "qwen3": lambda: Qwen3Config(**TINY_CONFIG, head_dim=32),
    }[arch]()


class TinyModels:
    """Builds each tiny checkpoint (weights + tokenizer) once per session: name -> (dir, HF model)."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._cache = {}

    def __call__(self, arch: str):
        if arch not in self._cache:
            import torch
            from transformers import AutoModelForCausalLM

            torch.manual_seed(sum(map(ord, arch)))
            model = AutoModelForCausalLM.from_config(tiny_hf_config(arch), dtype=torch.float32).eval()
            path = self._factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            build_tokenizer().save_pretrained(path)
            self._cache[arch] = (str(path), model)
        return self._cache[arch]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("llama") -> (checkpoint dir with tokenizer, the transformers model in fp32)."""
    return TinyModels(tmp_path_factory)
