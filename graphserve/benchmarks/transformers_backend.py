"""The peer in `graphserve bench throughput --backend transformers|both`: transformers' continuous batching.

The model is built with `AutoModelForCausalLM.from_config` from the same config graphserve serves (random
weights, which do not change speed), in the same dtype, on the GPU when there is one, and runs
`model.generate_batch(list_of_token_id_lists, GenerationConfig)` (transformers 5.x) on the very prompts graphserve
gets, greedy, with EOS disabled so every request decodes exactly its output length.
"""
from __future__ import annotations

import gc
import time
from typing import Any


def hf_device(device: str) -> str:
    """Where the transformers model runs: the GPU when one is visible and not overridden by --device cpu."""
    import torch

    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def build_hf_model(hf_config: Any, dtype: str, device: str, attn_implementation: str | None = None):
    """A random-weight transformers model of `hf_config`, created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device):  # drawing billions of random weights on the host would take minutes
        model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    return model.eval()


def _cb_config(num_blocks: int | None, max_batch_tokens: int | None):
    """transformers' ContinuousBatchingConfig when a limit is given, else None (its own sizing)."""
    if num_blocks is None and max_batch_tokens is None:
        return None
    from transformers.generation import ContinuousBatchingConfig

    kwargs = {"num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens}
    return ContinuousBatchingConfig(**{k: v for k, v in kwargs.items() if v is not None})


def _active_span(outputs: list) -> float | None:
    """Seconds from the first submission to the last finish, from the outputs' own timestamps (None if absent)."""
    try:
        starts = [o.created_time for o in outputs]
        ends = [o.lifespan[1] for o in outputs]
    except AttributeError:  # a transformers version without per-request timestamps
        return None
    if not outputs or min(ends) <= 0:
        return None
    span = max(ends) - min(starts)
    return span if span > 0 else None


class TransformersRunner:
    """Runs workloads through one transformers model with `generate_batch` and measures each."""

    def __init__(self, hf_config: Any, dtype: str, device: str, attn_implementation: str | None = None,
                 num_blocks: int | None = None, max_batch_tokens: int | None = None) -> None:
        t0 = time.perf_counter()
        self.device = hf_device(device)
        self.model = build_hf_model(hf_config, dtype, self.device, attn_implementation)
        self.load_s = time.perf_counter() - t0
        self.cb_config = _cb_config(num_blocks, max_batch_tokens)
        self.pad_token_id = getattr(hf_config, "pad_token_id", None) or 0

    def generate(self, prompts: list[list[int]], output_len: int) -> tuple[dict, float]:
        """generate_batch on `prompts` (greedy, EOS disabled); returns (outputs by request id, wall seconds)."""
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1,
                                  pad_token_id=self.pad_token_id)
        kwargs = {"continuous_batching_config": self.cb_config} if self.cb_config is not None else {}
        self._synchronize()
        t0 = time.perf_counter()
        outputs = self.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False, **kwargs)
        self._synchronize()
        return outputs, time.perf_counter() - t0

    def run(self, prompts: list[list[int]], output_len: int) -> dict:
        """Throughput of one workload. `elapsed_s` runs from the first request's submission to the last finish
        (generate_batch's own manager start-up and warm-up excluded, as graphserve's start-up is); `wall_s`
        includes them."""
        from graphserve.benchmarks.roofline import sig

        outputs, wall_s = self.generate(prompts, output_len)
        done = [o for o in outputs.values() if o.error is None]
        span = _active_span(done)
        elapsed = span if span else wall_s
        num_in = sum(len(o.prompt_ids) for o in done)
        num_out = sum(len(o.generated_tokens) for o in done)
        return {
            "num_prompts": len(prompts), "completed": len(done), "failed": len(prompts) - len(done),
            "all_complete": len(done) == len(prompts) and num_out == output_len * len(prompts),
            "input_tokens": num_in, "output_tokens": num_out,
            "elapsed_s": sig(elapsed), "elapsed_from": "request timestamps" if span else "wall clock",
            "wall_s": sig(wall_s),
            "requests_per_s": round(len(done) / elapsed, 3),
            "output_tokens_per_s": round(num_out / elapsed, 2),
            "total_tokens_per_s": round((num_in + num_out) / elapsed, 2),
        }

    def describe(self) -> dict:
        """What ran: device, dtype, attention implementation and the continuous-batching limits given."""
        cfg = self.model.config
        return {"device": self.device, "dtype": str(self.model.dtype).removeprefix("torch."),
                "attn_implementation": getattr(cfg, "_attn_implementation", None),
                "load_s": round(self.load_s, 2),
                "num_blocks": getattr(self.cb_config, "num_blocks", None),
                "max_batch_tokens": getattr(self.cb_config, "max_batch_tokens", None)}

    def close(self) -> None:
        """Free the model (and its device memory) before graphserve sizes its KV cache from what is free."""
        import torch

        del self.model
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _synchronize(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
