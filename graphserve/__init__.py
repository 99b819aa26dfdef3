"""graphserve: an LLM inference and serving engine (paged KV cache, continuous batching, torch.compile)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest"]

if TYPE_CHECKING:
    from graphserve.entrypoints.llm import LLM
    from graphserve.lora.request import LoRARequest
    from graphserve.outputs import CompletionOutput, RequestOutput
    from graphserve.sampling_params import SamplingParams

# Imported lazily so that `import graphserve.core` (pure Python) does not pull in torch.
_LAZY = {
    "LLM": "graphserve.entrypoints.llm",
    "SamplingParams": "graphserve.sampling_params",
    "RequestOutput": "graphserve.outputs",
    "CompletionOutput": "graphserve.outputs",
    "LoRARequest": "graphserve.lora.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphserve' has no attribute {name!r}")
