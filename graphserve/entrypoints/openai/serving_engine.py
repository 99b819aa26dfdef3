"""What every endpoint handler shares: the engine, the served models, request admission and streaming helpers."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from graphserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError, RequestStream
from graphserve.entrypoints.openai.errors import OpenAIError, error_body
from graphserve.entrypoints.openai.protocol import SamplingRequest
from graphserve.entrypoints.openai.serving_models import OpenAIServingModels
from graphserve.lora.request import LoRARequest
from graphserve.outputs import RequestOutput
from graphserve.sampling_params import SamplingParams

T = TypeVar("T")


def random_uuid() -> str:
    """A fresh id suffix for request ids."""
    return uuid.uuid4().hex


def sse(payload: str) -> str:
    """One server-sent event."""
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


def engine_error_to_openai(error: BaseException, fields: Sequence[str] = ()) -> OpenAIError:
    """Map what the engine raises for a request to the HTTP answer (a client mistake is never a 500)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ValueError):
        return OpenAIError.bad_request(error, fields)
    if isinstance(error, RequestAbortedError):
        return OpenAIError(str(error), 503)
    if isinstance(error, EngineDeadError):
        return OpenAIError(str(error), 500)
    return OpenAIError(f"Internal server error: {type(error).__name__}: {error}", 500)


def sse_error(error: BaseException) -> str:
    """An error in the middle of a stream: one event with OpenAI's error body (the status line is already sent)."""
    import json

    err = engine_error_to_openai(error)
    return sse(json.dumps(error_body(err.message, err.status_code, err.param)))


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive: yields (stream index, output)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield i, output
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()


async def last_output(stream: RequestStream) -> RequestOutput:
    """The final output of a request (its only one when FINAL_ONLY)."""
    output = None
    async for item in stream:
        output = item
    if output is None:
        raise RuntimeError(f"request {stream.request_id} ended without output")
    return output


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(work: Awaitable[T], raw_request: Request) -> T:
    """Await `work`, cancelling it if the client goes away first (a non-streaming request is then aborted)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation run its course (the requests' finally blocks abort them) and consume its
            # outcome, so nothing is left un-retrieved.
            await asyncio.gather(task, return_exceptions=True)
            raise OpenAIError("Client disconnected", 400)
    return task.result()


class OpenAIServing:
    """Base of the endpoint handlers: model check, limits, and turning prompts into engine streams."""

    request_fields: tuple[str, ...] = ()  # names that may start a ValueError's message (its `param`)

    def __init__(self, engine: AsyncLLM, models: OpenAIServingModels, max_n: int) -> None:
        self.engine = engine
        self.models = models
        self.max_n = max_n

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter `model` names, None for the base model (a served name, or no model); 404 otherwise."""
        return self.models.resolve(model)

    def model_name(self, lora_request: LoRARequest | None = None) -> str:
        """The name responses report: the adapter's, else the first served name."""
        return self.models.model_name(lora_request)

    def sampling_params(self, request: SamplingRequest, **kwargs: Any) -> SamplingParams:
        """Build and validate the request's SamplingParams (400 naming the field on a bad value)."""
        for name in ("n", "best_of"):
            value = getattr(request, name)
            if value is not None and value > self.max_n:
                raise OpenAIError(f"{name} must be at most {self.max_n}, got {value}.", 400, name)
        try:
            return request.to_sampling_params(**kwargs)
        except ValueError as e:
            raise OpenAIError.bad_request(e, self.request_fields) from None

    def add_requests(
        self, request_id: str, prompts: Sequence[Any], params: SamplingParams, add_special_tokens: bool,
        cache_salt: str | None = None, lora_request: LoRARequest | None = None,
    ) -> list[RequestStream]:
        """Queue one engine request per prompt (with the request's adapter, if any); all or none (a bad prompt aborts
        the ones already queued)."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                if cache_salt is not None:
                    key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
                    prompt = {key: prompt, "cache_salt": cache_salt}
                sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.add_request(sub_id, prompt, params, add_special_tokens,
                                                       lora_request=lora_request))
        except Exception as e:
            for stream in streams:
                stream.abort()
            raise engine_error_to_openai(e, self.request_fields) from None
        return streams
