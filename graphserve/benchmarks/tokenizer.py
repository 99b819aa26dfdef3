"""The benchmark tokenizer: a small byte-level BPE trained in memory, for models with random (dummy) weights.

A config directory such as perf/configs/llama-3-8b holds only config.json, yet the engine needs a tokenizer for
its input and output processing. Benchmarks send token ids and never read the text, so any tokenizer serves:
this one is built offline in a fraction of a second, cached in a directory, and passed as `tokenizer=`. Output
ids past its vocabulary detokenize to nothing (the detokenizer skips them). The test suite's tiny checkpoints use
the same tokenizer (perf/tiny_checkpoint.py).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

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


def benchmark_tokenizer_dir(root: str | None = None) -> str:
    """A directory holding the benchmark tokenizer (built on first use, under the temp dir by default)."""
    path = os.path.join(root or tempfile.gettempdir(), "graphserve-perf-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        # Save to a private directory, then rename: concurrent benchmarks never see a half-written tokenizer.
        staging = tempfile.mkdtemp(prefix="graphserve-perf-tokenizer-", dir=os.path.dirname(path))
        build_tokenizer().save_pretrained(staging)
        try:
            os.rename(staging, path)
        except OSError:  # another process won the race, or a stale directory is in the way
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                build_tokenizer().save_pretrained(path)
    return path


def bench_engine_args(args: Any):
    """EngineArgs from a benchmark's parsed CLI; dummy weights get the benchmark tokenizer unless one is given."""
    from graphserve.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.load_format == "dummy" and engine_args.tokenizer is None:
        engine_args.tokenizer = benchmark_tokenizer_dir()  # token-id workloads: any tokenizer serves
    return engine_args
