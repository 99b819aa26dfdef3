"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: serve LoRA adapters by name while the server runs.

As in vLLM, success is a 200 with a plain-text message. Errors carry OpenAI's body: 400 when LoRA is off, the name
is taken, a field is missing or the adapter does not fit the model (the registry's message); 404 when unloading a
name that is not loaded. Both sit behind the API key like every /v1 route. An unloaded adapter's requests in flight
finish with it; new requests naming it get 404.
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from graphserve.entrypoints.openai.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from graphserve.entrypoints.openai.serving_models import OpenAIServingModels

logger = logging.getLogger(__name__)

router = APIRouter()


def _models(raw_request: Request) -> OpenAIServingModels:
    return raw_request.app.state.server.models


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: LoadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
    """Check the adapter at `lora_path` against the model and serve it as the model `lora_name`."""
    lora_request = _models(raw_request).load_lora_adapter(request.lora_name, request.lora_path)
    logger.info("loaded LoRA adapter %r (id %d) from %s", lora_request.lora_name, lora_request.lora_int_id,
                lora_request.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw_request: Request) -> PlainTextResponse:
    """Stop serving the adapter `lora_name`."""
    lora_request = _models(raw_request).unload_lora_adapter(request.lora_name, request.lora_int_id)
    logger.info("unloaded LoRA adapter %r (id %d)", lora_request.lora_name, lora_request.lora_int_id)
    return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")
