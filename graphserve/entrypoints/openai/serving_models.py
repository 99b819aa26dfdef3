"""GET /v1/models: the names this server answers to."""
from __future__ import annotations

from collections.abc import Sequence

from graphserve.entrypoints.openai.protocol import ModelCard, ModelList


class OpenAIServingModels:
    """The served model names (the first is the one responses report) and what /v1/models lists."""

    def __init__(self, served_model_names: Sequence[str], model_path: str, max_model_len: int) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must not be empty")
        self.served_model_names = list(served_model_names)
        self.model_path = model_path
        self.max_model_len = max_model_len

    def show_available_models(self) -> ModelList:
        """One card per served name."""
        return ModelList(data=[
            ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len)
            for name in self.served_model_names
        ])
