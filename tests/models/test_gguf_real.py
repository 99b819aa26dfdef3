"""The real Qwen2.5-Coder-0.5B GGUF (Q5_0, Q8_0, Q4_K, Q6_K tensors; ../shared/docs/real-data.md) kept in its blocks
computes the greedy tokens of the dequantize-at-load path. Skipped unless the file is already cached
(`python -m perf.real_models qwen2.5-coder-0.5b` fetches it)."""
import os

import pytest
import torch
from model_testutils import our_logits

from graphserve import envs
from graphserve.models.config_loader import create_model_config
from graphserve.models.loader import get_model

pytestmark = pytest.mark.slow
NEW_TOKENS = 8


def _cached_path() -> str:
    from perf.real_models import REAL_MODELS

    spec = REAL_MODELS["qwen2.5-coder-0.5b"]
    path = os.path.join(envs.GRAPHSERVE_CACHE_DIR, "models", "qwen2.5-coder-0.5b", spec.file_name)
    if not (os.path.isfile(path) and os.path.getsize(path) == spec.size):
        pytest.skip("Qwen2.5-Coder-0.5B GGUF not cached (python -m perf.real_models qwen2.5-coder-0.5b)")
    return path


@torch.no_grad()
def test_real_qwen_kept_quantized_greedy_equals_dequantized():
    from transformers import AutoTokenizer

    path = _cached_path()
    dense_config = create_model_config(path, dtype="float32")
    kept_config = create_model_config(path, dtype="float32", quantization="gguf")
    kept_types = set(kept_config.quantization_config["tensor_types"].values())
    assert {6, 12, 14} <= kept_types  # Q5_0, Q4_K and Q6_K projections really take the block kernels
    tokenizer = AutoTokenizer.from_pretrained(dense_config.model, gguf_file=dense_config.gguf_file)
    ids = torch.tensor(tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n").input_ids)
    dense = get_model(dense_config, "cpu")
    for _ in range(NEW_TOKENS):  # greedy continuation, full recompute (no KV cache needed)
        ids = torch.cat([ids, our_logits(dense, ids)[-1].argmax().reshape(1)])
    dense_logits = our_logits(dense, ids)
    del dense
    kept = get_model(kept_config, "cpu")
    kept_logits = our_logits(kept, ids)  # teacher-forced: the same argmax at every position = the same greedy run
    prompt_len = ids.shape[0] - NEW_TOKENS
    assert torch.equal(kept_logits[prompt_len - 1:-1].argmax(-1), ids[prompt_len:])
    assert (kept_logits - dense_logits).abs().max() < 1e-2 * dense_logits.abs().max()
