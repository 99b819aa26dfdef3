"""POST /v1/chat/completions: messages through the chat template; plain or streamed (SSE)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from graphserve.engine.async_llm import RequestStream
from graphserve.entrypoints.openai.errors import OpenAIError
from graphserve.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from graphserve.entrypoints.openai.serving_completion import clamp_logprob
from graphserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    cancel_on_disconnect,
    engine_error_to_openai,
    last_output,
    random_uuid,
    sse,
    sse_error,
)
from graphserve.outputs import CompletionOutput, Logprob


def _logprob_entry(lp: Logprob) -> ChatCompletionLogProb:
    token = lp.decoded_token or ""
    return ChatCompletionLogProb(token=token, logprob=clamp_logprob(lp.logprob),
                                 bytes=list(token.encode("utf-8", errors="replace")))


def chat_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, Logprob]] | None, num_top: int
) -> ChatCompletionLogProbs:
    """OpenAI's chat shape: per generated token its logprob and the `num_top` most likely tokens, by rank."""
    content = []
    for pos, token_id in enumerate(token_ids):
        step = steps[pos] if steps is not None and pos < len(steps) else None
        if step is None or token_id not in step:
            continue
        entry = _logprob_entry(step[token_id])
        top = sorted((lp for lp in step.values() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda lp: lp.rank)
        content.append(ChatCompletionLogProbsContent(
            token=entry.token, logprob=entry.logprob, bytes=entry.bytes,
            top_logprobs=[_logprob_entry(lp) for lp in top],
        ))
    return ChatCompletionLogProbs(content=content)


@dataclass
class _Chat:
    """One chat request while it is being answered."""

    request: ChatCompletionRequest
    request_id: str
    model: str
    n: int
    role: str
    num_top_logprobs: int | None  # None: no logprobs asked
    created: int = field(default_factory=lambda: int(time.time()))

    def logprobs(self, completion: CompletionOutput) -> ChatCompletionLogProbs | None:
        """The completion's (new) tokens' logprobs, when asked for."""
        if self.num_top_logprobs is None:
            return None
        return chat_logprobs(completion.token_ids, completion.logprobs, self.num_top_logprobs)


class OpenAIServingChat(OpenAIServing):
    """Handler of /v1/chat/completions."""

    request_fields = tuple(ChatCompletionRequest.model_fields)

    def __init__(self, *args, response_role: str = "assistant", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.response_role = response_role

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        """Answer one chat request (an SSE stream when request.stream)."""
        lora_request = self.check_model(request.model)
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("top_logprobs can only be set when logprobs is true", 400, "top_logprobs")
        try:
            prompt = self.engine.input_processor.apply_chat_template(
                request.messages, add_generation_prompt=request.add_generation_prompt
            )
        except ValueError as e:
            raise OpenAIError(str(e), 400, "messages") from None
        except Exception as e:  # noqa: BLE001 (the template ran on what the client sent: its input, a 400)
            raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}", 400,
                              "messages") from None
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        params = self.sampling_params(request, max_tokens=max_tokens, logprobs=num_top,
                                      prompt_logprobs=request.prompt_logprobs)
        role = self.response_role if request.add_generation_prompt else str(request.messages[-1].get("role"))
        ctx = _Chat(request, f"chatcmpl-{random_uuid()}", self.model_name(lora_request), params.n, role, num_top)
        (stream,) = self.add_requests(ctx.request_id, [prompt], params, request.add_special_tokens,
                                      request.cache_salt, lora_request)
        if request.stream:
            return StreamingResponse(self._stream(ctx, stream), media_type="text/event-stream")
        try:
            output = await cancel_on_disconnect(last_output(stream), raw_request)
        except Exception as e:
            raise engine_error_to_openai(e, self.request_fields) from None
        finally:
            stream.abort()
        choices = [
            ChatCompletionResponseChoice(
                index=c.index, message=ChatMessage(role=role, content=c.text), logprobs=ctx.logprobs(c),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            )
            for c in output.outputs
        ]
        num_prompt_tokens = len(output.prompt_token_ids)
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated,
                          total_tokens=num_prompt_tokens + num_generated)
        response = ChatCompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model, choices=choices,
                                          usage=usage)
        return JSONResponse(response.model_dump())

    def _chunk(self, ctx: _Chat, choices: list[ChatCompletionStreamChoice],
               usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionStreamResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                             choices=choices, usage=usage)
        return sse(chunk.model_dump_json())

    async def _stream(self, ctx: _Chat, stream: RequestStream) -> AsyncIterator[str]:
        """A role chunk per choice, then content deltas as tokens arrive, then usage (if asked) and [DONE]."""
        num_prompt_tokens = num_generated = 0
        try:
            for i in range(ctx.n):
                yield self._chunk(ctx, [ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role=ctx.role,
                                                                                               content=""))])
            async for output in stream:
                num_prompt_tokens = len(output.prompt_token_ids)
                choices = []
                for c in output.outputs:
                    num_generated += len(c.token_ids)
                    if c.text or c.token_ids or c.finish_reason:
                        choices.append(ChatCompletionStreamChoice(
                            index=c.index, delta=DeltaMessage(content=c.text), logprobs=ctx.logprobs(c),
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        ))
                if choices:
                    yield self._chunk(ctx, choices)
            if ctx.request.include_usage:
                usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated,
                                  total_tokens=num_prompt_tokens + num_generated)
                yield self._chunk(ctx, [], usage)
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 (the status line is sent: report in-band)
            yield sse_error(e)
            yield SSE_DONE
        finally:
            stream.abort()
