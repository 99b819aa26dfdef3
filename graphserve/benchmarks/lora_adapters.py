"""Random PEFT LoRA adapters for benchmarks on dummy-weight models: written in the exact PEFT layout
(`adapter_config.json` + `adapter_model.safetensors`, formats.md §5.1-5.2) from a model's config alone."""
from __future__ import annotations

import json
import os

import torch

from graphserve.config import ModelConfig
from graphserve.lora.peft import SLICES, decoder_module_shapes
from graphserve.lora.request import LoRARequest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapters(model_config: ModelConfig, directory: str, num_adapters: int, rank: int = 16,
                          targets: tuple[str, ...] = ALL_TARGETS, seed: int = 0) -> list[LoRARequest]:
    """`num_adapters` adapters of `rank` on `targets` of every layer, with small random A and B (bf16); returns
    their LoRARequests (ids 1..n, names lora-1..lora-n)."""
    shapes = decoder_module_shapes(model_config)
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(1, num_adapters + 1):
        path = os.path.join(directory, f"lora-{i}")
        os.makedirs(path, exist_ok=True)
        tensors = {}
        for fused, shape in shapes.items():
            parent = fused.rpartition(".")[0]
            for target in targets:
                name, index = SLICES[target]
                if not fused.endswith("." + name):
                    continue
                key = f"base_model.model.{parent}.{target}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, shape.input_size, generator=g) * 0.01).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(shape.output_sizes[index], rank, generator=g)
                                                   * 0.01).bfloat16()
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
                       "bias": "none", "base_model_name_or_path": model_config.model}, f)
        requests.append(LoRARequest(f"lora-{i}", i, path))
    return requests


def add_lora_bench_args(parser) -> None:
    """`--num-lora-adapters N --lora-rank R`: serve the workload through N random adapters (with --enable-lora)."""
    parser.add_argument("--num-lora-adapters", type=int, default=0,
                        help="spread the requests evenly over this many random LoRA adapters (needs --enable-lora "
                             "and --max-loras)")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the random adapters")


def bench_lora_requests(args, llm) -> list[LoRARequest]:
    """The benchmark's adapters, written to a temporary directory ([] without --num-lora-adapters)."""
    import tempfile

    if not getattr(args, "num_lora_adapters", 0):
        return []
    if llm.llm_engine.config.lora_config is None:
        raise ValueError("--num-lora-adapters needs --enable-lora")
    return write_random_adapters(llm.llm_engine.model_config, tempfile.mkdtemp(prefix="gs-bench-lora-"),
                                 args.num_lora_adapters, rank=args.lora_rank)


def spread(loras: list[LoRARequest], num_prompts: int) -> list[LoRARequest] | None:
    """Request i gets adapter i mod n (None: no adapters)."""
    return [loras[i % len(loras)] for i in range(num_prompts)] if loras else None
