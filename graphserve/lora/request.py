"""The adapter a request asks for (vLLM's `LoRARequest`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter directory, named for the API and numbered for the engine.

    `lora_int_id` identifies the adapter inside the engine (slots, caches, prefix-cache keys): two requests with
    the same id must mean the same weights. It must be >= 1 (0 is the base model).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be a non-empty path")

    @property
    def cache_key(self) -> tuple[str, int, str]:
        """What the prefix cache keys an adapter's blocks on."""
        return ("lora", self.lora_int_id, self.lora_name)
