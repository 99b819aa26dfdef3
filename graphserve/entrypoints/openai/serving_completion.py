"""POST /v1/completions: prompts as text, token ids or lists of either; plain or streamed (SSE)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from graphserve.engine.async_llm import RequestStream
from graphserve.entrypoints.openai.errors import OpenAIError
from graphserve.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    UsageInfo,
)
from graphserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    cancel_on_disconnect,
    engine_error_to_openai,
    last_output,
    merge_streams,
    random_uuid,
    sse,
    sse_error,
)
from graphserve.outputs import Logprob, RequestOutput

_MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM reports this floor instead


def clamp_logprob(value: float) -> float:
    """A logprob JSON can carry."""
    return max(value, _MIN_LOGPROB)


def append_completion_logprobs(
    out: CompletionLogProbs, token_ids: Sequence[int], steps: Sequence[dict[int, Logprob] | None],
    decode: Callable[[int], str], text_offset: int,
) -> int:
    """Append tokens in the legacy shape (the chosen token and the top-k per position); returns the next offset.

    A position without logprobs (the first prompt token) gets None, as in OpenAI's echo responses.
    """
    for pos, token_id in enumerate(token_ids):
        step = steps[pos] if pos < len(steps) else None
        chosen = step.get(token_id) if step is not None else None
        if chosen is None:
            token = decode(token_id)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            token = chosen.decoded_token if chosen.decoded_token is not None else decode(token_id)
            out.token_logprobs.append(clamp_logprob(chosen.logprob))
            out.top_logprobs.append({(lp.decoded_token or ""): clamp_logprob(lp.logprob) for lp in step.values()})
        out.tokens.append(token)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return text_offset


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", 400, "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


@dataclass
class _Completion:
    """One completions request while it is being answered."""

    request: CompletionRequest
    request_id: str
    model: str
    n: int
    echo_only: bool  # echo with max_tokens=0: answer with the prompt alone
    created: int = field(default_factory=lambda: int(time.time()))
    # Streaming: DELTA sends a prompt's logprobs once, but each of its n choices echoes them.
    prompt_logprobs: dict[int, list] = field(default_factory=dict)


class OpenAIServingCompletion(OpenAIServing):
    """Handler of /v1/completions."""

    request_fields = tuple(CompletionRequest.model_fields)

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        """Answer one completions request (an SSE stream when request.stream)."""
        lora_request = self.check_model(request.model)
        if request.suffix is not None:
            raise OpenAIError("suffix is not currently supported", 400, "suffix")
        prompts = _prompt_list(request.prompt)
        echo_only = bool(request.echo) and request.max_tokens == 0
        logprobs = request.logprobs
        params = self.sampling_params(
            request,
            max_tokens=1 if echo_only else request.max_tokens,  # generate one token and drop it (vLLM)
            logprobs=logprobs,
            prompt_logprobs=logprobs if request.echo and logprobs is not None else request.prompt_logprobs,
        )
        ctx = _Completion(request, f"cmpl-{random_uuid()}", self.model_name(lora_request), params.n, echo_only)
        streams = self.add_requests(ctx.request_id, prompts, params, request.add_special_tokens, request.cache_salt,
                                    lora_request)
        if request.stream:
            return StreamingResponse(self._stream(ctx, streams), media_type="text/event-stream")
        try:
            outputs = await cancel_on_disconnect(asyncio.gather(*(last_output(s) for s in streams)), raw_request)
        except Exception as e:
            raise engine_error_to_openai(e, self.request_fields) from None
        finally:
            for stream in streams:
                stream.abort()
        return JSONResponse(self._response(ctx, outputs).model_dump())

    def _decode(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _prompt_text(self, output: RequestOutput) -> str:
        return output.prompt if output.prompt is not None else self.engine.tokenizer.decode(output.prompt_token_ids)

    def _response(self, ctx: _Completion, outputs: list[RequestOutput]) -> CompletionResponse:
        request = ctx.request
        choices, num_prompt_tokens, num_generated = [], 0, 0
        for i, output in enumerate(outputs):
            num_prompt_tokens += len(output.prompt_token_ids)
            for completion in output.outputs:
                token_ids, text, steps = completion.token_ids, completion.text, completion.logprobs
                if ctx.echo_only:
                    token_ids, text, steps = [], "", []
                logprobs = CompletionLogProbs() if request.logprobs is not None else None
                offset = 0
                if request.echo:
                    prompt_text = self._prompt_text(output)
                    text = prompt_text + text
                    if logprobs is not None:
                        offset = append_completion_logprobs(
                            logprobs, output.prompt_token_ids, output.prompt_logprobs or [], self._decode, 0
                        )
                if logprobs is not None:
                    append_completion_logprobs(logprobs, token_ids, steps or [], self._decode, offset)
                num_generated += len(token_ids)
                choices.append(CompletionResponseChoice(
                    index=i * ctx.n + completion.index, text=text, logprobs=logprobs,
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                ))
        usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_generated,
                          total_tokens=num_prompt_tokens + num_generated)
        return CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model, choices=choices,
                                  usage=usage)

    async def _stream(self, ctx: _Completion, streams: list[RequestStream]) -> AsyncIterator[str]:
        """SSE chunks as tokens arrive; an engine failure ends the stream with an error event."""
        request = ctx.request
        num_prompt_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}  # choice index -> text offset of its next logprobs token
        num_generated = 0
        try:
            async for i, output in merge_streams(streams):
                if i not in num_prompt_tokens:
                    num_prompt_tokens[i] = len(output.prompt_token_ids)
                choices = []
                for completion in output.outputs:
                    choice, num_new = self._stream_choice(ctx, i, output, completion, offsets)
                    num_generated += num_new
                    if choice is not None:
                        choices.append(choice)
                if choices:
                    chunk = CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                               choices=choices)
                    yield sse(chunk.model_dump_json())
            if request.include_usage:
                prompt_tokens = sum(num_prompt_tokens.values())
                usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=num_generated,
                                  total_tokens=prompt_tokens + num_generated)
                chunk = CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model, choices=[],
                                           usage=usage)
                yield sse(chunk.model_dump_json())
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 (the status line is sent: report in-band)
            yield sse_error(e)
            yield SSE_DONE
        finally:
            for stream in streams:
                stream.abort()

    def _stream_choice(self, ctx: _Completion, i: int, output: RequestOutput, completion,
                       offsets: dict[int, int]) -> tuple[CompletionResponseChoice | None, int]:
        """One streamed choice for a DELTA completion (None when it carries nothing), and its new token count."""
        request = ctx.request
        index = i * ctx.n + completion.index
        token_ids, text, steps = completion.token_ids, completion.text, completion.logprobs
        if ctx.echo_only:
            token_ids, text, steps = [], "", []
        logprobs = CompletionLogProbs() if request.logprobs is not None else None
        if output.prompt_logprobs is not None:
            ctx.prompt_logprobs.setdefault(i, output.prompt_logprobs)
        if request.echo and index not in offsets:  # the first chunk of a choice repeats the prompt
            text = self._prompt_text(output) + text
            if logprobs is not None:
                offsets[index] = append_completion_logprobs(
                    logprobs, output.prompt_token_ids, ctx.prompt_logprobs.get(i, []), self._decode, 0
                )
        if logprobs is not None:
            offsets[index] = append_completion_logprobs(
                logprobs, token_ids, steps or [], self._decode, offsets.get(index, 0)
            )
        else:
            offsets.setdefault(index, 0)
        if not (text or token_ids or completion.finish_reason):
            return None, 0
        choice = CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
        return choice, len(token_ids)
