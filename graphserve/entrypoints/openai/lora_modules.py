"""`--lora-modules` entries, parsed without importing the server (the CLI builds every parser at start)."""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAModulePath:
    """One `--lora-modules` entry: the adapter's model name, its PEFT directory, and the model it belongs to."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, value: str) -> LoRAModulePath:
        """`name=path`, or vLLM's JSON form `{"name": ..., "path": ..., "base_model_name": ...}`; ValueError else."""
        value = value.strip()
        if value.startswith("{"):
            try:
                data = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            if "local_path" in data and "path" not in data:  # vLLM 0.6's spelling
                data["path"] = data.pop("local_path")
            unknown = sorted(set(data) - {"name", "path", "base_model_name"})
            if unknown:
                raise ValueError(f"unknown keys {unknown} (expected name, path, base_model_name)")
            name, path, base = data.get("name"), data.get("path"), data.get("base_model_name")
            if base is not None and (not isinstance(base, str) or not base):
                raise ValueError("base_model_name must be a non-empty string")
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise ValueError("expected name=path or a JSON object")
            base = None
        if not isinstance(name, str) or not name.strip():
            raise ValueError("the adapter name must be a non-empty string")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"the path of adapter {name!r} must be a non-empty string")
        return cls(name.strip(), path.strip(), base)
