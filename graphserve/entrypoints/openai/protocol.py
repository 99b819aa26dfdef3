"""Request and response bodies of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Request models are strict about JSON types ("n": "2" is a 400, as with OpenAI) and ignore unknown fields (as
OpenAI and vLLM do). Value ranges are checked once, by SamplingParams, whose messages name the field.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from graphserve.sampling_params import RequestOutputKind, SamplingParams

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class OpenAIBaseModel(BaseModel):
    """Request bodies: JSON types checked strictly, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(OpenAIBaseModel):
    """`stream_options`: include_usage adds a last chunk with the token counts."""

    include_usage: Optional[bool] = False


class SamplingRequest(OpenAIBaseModel):
    """Fields that completions and chat share, including vLLM's extras (sent by the openai client's extra_body)."""

    model: Optional[str] = None
    n: Optional[int] = 1
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Optional[int] = None
    # Prefix-cache isolation: requests with different salts never share cached KV blocks.
    cache_salt: Optional[str] = None

    @model_validator(mode="after")
    def _check_stream_options(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        return self

    def to_sampling_params(
        self, max_tokens: Optional[int], logprobs: Optional[int], prompt_logprobs: Optional[int],
        default_temperature: float = 1.0,
    ) -> SamplingParams:
        """The engine's SamplingParams (raises ValueError naming the field when a value is out of range)."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            best_of=self.best_of,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias=self.logit_bias,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: Optional[str] = None
    max_tokens: Optional[int] = 16
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    add_special_tokens: bool = True


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions (messages are checked by the input processor: roles, text parts)."""

    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    # The chat template already holds BOS and the other special tokens.
    add_special_tokens: bool = False


class TokenizeRequest(OpenAIBaseModel):
    """POST /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _check_one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(OpenAIBaseModel):
    """POST /detokenize."""

    model: Optional[str] = None
    tokens: list[int]


# -- responses ----------------------------------------------------------------------------------------------------
class ResponseModel(BaseModel):
    """Response bodies."""


class UsageInfo(ResponseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(ResponseModel):
    """The inside of OpenAI's error body."""

    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(ResponseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class CompletionLogProbs(ResponseModel):
    """The legacy completions logprobs shape."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    """One completion (also a streamed chunk's choice, with only the new text)."""

    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(ResponseModel):
    """The body of a completions response, or one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: Optional[UsageInfo] = None


class ChatCompletionLogProb(ResponseModel):
    """One token's logprob in OpenAI's chat shape."""

    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    """A generated token with its top alternatives."""

    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    """`choices[i].logprobs` of a chat completion."""

    content: Optional[list[ChatCompletionLogProbsContent]] = None


class ChatMessage(ResponseModel):
    """The assistant's reply."""

    role: str
    content: Optional[str] = None


class ChatCompletionResponseChoice(ResponseModel):
    """One reply of a chat completion."""

    index: int
    message: ChatMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(ResponseModel):
    """The body of a chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    """What a streamed chat chunk adds to a reply."""

    role: Optional[str] = None
    content: Optional[str] = None


class ChatCompletionStreamChoice(ResponseModel):
    """One choice of a streamed chat chunk."""

    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(ResponseModel):
    """One streamed chat chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(ResponseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "graphserve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(ResponseModel):
    """POST /tokenize."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(ResponseModel):
    """POST /detokenize."""

    prompt: str
