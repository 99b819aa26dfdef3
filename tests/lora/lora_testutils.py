"""PEFT adapters for the tiny test models, written by the `peft` package itself, and their reference outputs."""
from __future__ import annotations

import copy

import torch


def write_peft_adapter(hf_model, path: str, r: int, target_modules: list[str], lora_alpha: float, seed: int,
                       use_rslora: bool = False, rank_pattern: dict | None = None, scale: float = 0.3):
    """Save a LoRA adapter for `hf_model` at `path` with random non-zero A and B; return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora,
                        rank_pattern=rank_pattern or {}, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(hf_model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    model.save_pretrained(path)
    return model.eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by transformers (+ peft), prompt alone, EOS not special (as ignore_eos): the argmax of
    a full forward per token (generate's min_new_tokens would mask EOS instead of ignoring it)."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]
