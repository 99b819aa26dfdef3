"""The model names this server answers to: the served base model and its LoRA adapters (GET /v1/models).

Every endpoint resolves a request's `model` here: a served name is the base model, a loaded adapter's name is that
adapter's LoRARequest, anything else is a 404. Adapters come from `--lora-modules` at start-up and from
/v1/load_lora_adapter at run time; each gets a fresh engine id (1, 2, ...) that is never reused in the process, so
requests still running with an unloaded adapter keep their weights.
"""
from __future__ import annotations

from collections.abc import Sequence

from graphserve.entrypoints.openai.errors import OpenAIError
from graphserve.entrypoints.openai.lora_modules import LoRAModulePath
from graphserve.entrypoints.openai.protocol import ModelCard, ModelList
from graphserve.lora.peft import AdapterRegistry
from graphserve.lora.request import LoRARequest


class OpenAIServingModels:
    """The served model names (the first is the one base-model responses report) and the loaded LoRA adapters.

    `registry` is the engine's AdapterRegistry: an adapter is checked there (files, ranks, modules) before its name
    answers, and forgotten there when it is unloaded.
    """

    def __init__(self, served_model_names: Sequence[str], model_path: str, max_model_len: int,
                 registry: AdapterRegistry | None = None, lora_modules: Sequence[LoRAModulePath] = ()) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must not be empty")
        self.served_model_names = list(served_model_names)
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.registry = registry
        self.lora_requests: dict[str, LoRARequest] = {}  # adapter name -> its request, in load order
        self._parents: dict[str, str] = {}  # adapter name -> the base model name /v1/models reports
        self._next_id = 1
        for module in lora_modules:
            try:
                self.load_lora_adapter(module.name, module.path, module.base_model_name)
            except OpenAIError as e:
                raise ValueError(f"--lora-modules {module.name}={module.path}: {e.message}") from None

    @property
    def lora_enabled(self) -> bool:
        """Whether the engine serves LoRA adapters (--enable-lora)."""
        return self.registry is not None and self.registry.lora_config is not None

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for a name this server does not serve.

        A missing model means the base model.
        """
        if model is None or model in self.served_model_names:
            return None
        lora_request = self.lora_requests.get(model)
        if lora_request is None:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, "model")
        return lora_request

    def model_name(self, lora_request: LoRARequest | None = None) -> str:
        """The name a response reports: the adapter's, else the first served name."""
        return lora_request.lora_name if lora_request is not None else self.served_model_names[0]

    def load_lora_adapter(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        """Check the adapter through the engine's registry and serve it as `name` (400 on any problem)."""
        if not self.lora_enabled:
            raise OpenAIError("LoRA is not enabled: start the server with --enable-lora to serve adapters.", 400)
        if not name:
            raise OpenAIError("lora_name must be a non-empty string.", 400, "lora_name")
        if not path:
            raise OpenAIError("lora_path must be a non-empty path.", 400, "lora_path")
        if name in self.served_model_names:
            raise OpenAIError(f"The name '{name}' is a served model name; an adapter needs another name.", 400,
                              "lora_name")
        if name in self.lora_requests:
            raise OpenAIError(f"The lora adapter '{name}' has already been loaded.", 400, "lora_name")
        known_ids = [r.lora_int_id for r in self.registry.list()]
        lora_int_id = max([self._next_id, *(i + 1 for i in known_ids)])
        lora_request = LoRARequest(name, lora_int_id, path)
        try:
            self.registry.check(lora_request)
        except ValueError as e:
            raise OpenAIError(str(e), 400, "lora_path") from None
        self._next_id = lora_int_id + 1
        self.lora_requests[name] = lora_request
        self._parents[name] = base_model_name or self.served_model_names[0]
        return lora_request

    def unload_lora_adapter(self, name: str, lora_int_id: int | None = None) -> LoRARequest:
        """Stop serving `name` (requests already running with it finish); 404 when no such adapter is loaded."""
        lora_request = self.lora_requests.get(name)
        if lora_request is None:
            raise OpenAIError(f"The lora adapter '{name}' cannot be found.", 404, "lora_name")
        if lora_int_id is not None and lora_int_id != lora_request.lora_int_id:
            raise OpenAIError(f"The lora adapter '{name}' has lora_int_id {lora_request.lora_int_id}, "
                              f"not {lora_int_id}.", 404, "lora_int_id")
        del self.lora_requests[name]
        del self._parents[name]
        self.registry.forget(lora_request.lora_int_id)
        return lora_request

    def show_available_models(self) -> ModelList:
        """One card per served name, then one per loaded adapter (`root` its directory, `parent` its base)."""
        cards = [ModelCard(id=name, root=self.model_path, max_model_len=self.max_model_len)
                 for name in self.served_model_names]
        cards += [ModelCard(id=name, root=request.lora_path, parent=self._parents[name])
                  for name, request in self.lora_requests.items()]
        return ModelList(data=cards)
