"""AsyncLLM: the engine for asyncio callers (the OpenAI server).

The frontend half runs on the event loop: input processing (tokenize, validate, fan out) and output processing
(detokenize, stop strings, gather children). The engine core runs behind an `EngineCoreClient` (a background
thread today): only core `Request`s and aborts go to it, only `EngineCoreOutputs` batches come back, and every
batch is handed to the loop with `call_soon_threadsafe`. Every request in flight shares each engine step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from graphserve.config import EngineConfig
from graphserve.core.kv_cache_manager import cdiv
from graphserve.core.request import Request, RequestStatus
from graphserve.core.scheduler import max_kv_tokens
from graphserve.engine.arg_utils import EngineArgs
from graphserve.engine.core_client import EngineCoreOutputs, EngineDeadError, make_engine_core_client
from graphserve.engine.input_processor import InputProcessor, PromptType
from graphserve.engine.output_processor import OutputProcessor
from graphserve.engine.tokenizer import get_tokenizer
from graphserve.lora.request import LoRARequest
from graphserve.metrics.stats import RequestStatsTracker, StatLoggerBase
from graphserve.outputs import RequestOutput
from graphserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "RequestAbortedError", "RequestStream"]


class RequestAbortedError(RuntimeError):
    """The request was aborted by someone other than its reader."""


def merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append a DELTA output to one its reader has not taken yet (texts, token ids and logprobs concatenate)."""
    by_index = {c.index: c for c in into.outputs}
    for completion in new.outputs:
        old = by_index.get(completion.index)
        if old is None:
            into.outputs.append(completion)
            continue
        old.text += completion.text
        old.token_ids = old.token_ids + completion.token_ids
        if old.logprobs is not None and completion.logprobs is not None:
            old.logprobs = old.logprobs + completion.logprobs
        old.cumulative_logprob = completion.cumulative_logprob
        old.finish_reason, old.stop_reason = completion.finish_reason, completion.stop_reason
    into.finished = new.finished
    into.metrics = new.metrics
    into.num_cached_tokens = new.num_cached_tokens


class RequestStream:
    """The outputs of one request as an async iterator; DELTA outputs pile up merged while nobody reads."""

    def __init__(self, request_id: str, engine: AsyncLLM, delta: bool) -> None:
        self.request_id = request_id
        self.finished = False  # the iterator is exhausted (last output delivered, or an error raised)
        self._engine = engine
        self._delta = delta
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        """Hand over an output (called by the engine's output handler)."""
        if self._output is None or not self._delta:
            self._output = output  # CUMULATIVE outputs supersede each other
        else:
            merge_delta(self._output, output)
        self._ready.set()

    def put_error(self, error: BaseException) -> None:
        """End the stream with an error (after any output still pending)."""
        self._error = error
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._output is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        output, self._output = self._output, None
        if output is not None:
            self.finished = output.finished
            return output
        self.finished = True
        raise self._error

    def abort(self) -> None:
        """Abort the request unless it already finished (idempotent); its KV blocks are freed before next step."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncLLM:
    """Many concurrent requests, each an async stream of RequestOutputs, over one engine core."""

    def __init__(
        self,
        config: EngineConfig,
        chat_template: str | None = None,
        log_requests: bool = True,
        stat_loggers: Iterable[StatLoggerBase] = (),
    ) -> None:
        mc = config.model_config
        gguf_file = mc.gguf_file if mc.tokenizer == mc.model else None
        self.tokenizer = get_tokenizer(mc.tokenizer, gguf_file=gguf_file, chat_template=chat_template)
        self.model_config = mc
        self.input_processor = InputProcessor(mc, self.tokenizer, config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=True)
        self.log_requests = log_requests
        self.stat_loggers = list(stat_loggers)
        self.stats_tracker = RequestStatsTracker()
        self._streams: dict[str, RequestStream] = {}
        self._child_ids: dict[str, list[str]] = {}  # request id -> its engine requests (best_of children)
        self._parent_of: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead_error: str | None = None  # why the engine died, once it did
        self.engine_core = make_engine_core_client(config, self._on_core_outputs)
        self.config = self.engine_core.config

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        """Build the engine from user settings (blocks while the model loads)."""
        return cls(engine_args.create_engine_config(), chat_template=engine_args.chat_template, **kwargs)

    # -- requests -----------------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        add_special_tokens: bool = True,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Validate and queue one prompt; returns its stream. Raises ValueError for a bad request.

        Must be called on the event loop that reads the stream. `params.output_kind` decides what each output
        holds (DELTA for streaming clients).
        """
        self._check_alive()
        self._loop = asyncio.get_running_loop()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = self.input_processor.process_inputs(
            request_id, prompt, params, arrival_time=arrival_time, add_special_tokens=add_special_tokens,
            lora_request=lora_request,
        )
        first = children[0]
        self._check_fits_kv_cache(first)
        child_ids = [child.request_id for child in children]
        self.output_processor.add_request(
            request_id, self.input_processor.get_prompt_text(prompt), first.prompt_token_ids, params, child_ids,
            first.arrival_time,
        )
        stream = RequestStream(request_id, self, delta=params.output_kind == RequestOutputKind.DELTA)
        self._streams[request_id] = stream
        self._child_ids[request_id] = child_ids
        for child in children:
            self._parent_of[child.request_id] = request_id
            self.stats_tracker.add_sequence(child.request_id, child.arrival_time, child.num_prompt_tokens)
            self.engine_core.add_request(child)
        if self.log_requests:
            logger.info("Added request %s: %d prompt tokens, %r", request_id, first.num_prompt_tokens, params)
        return stream

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str, add_special_tokens: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """vLLM's AsyncLLM.generate: yield the request's outputs; leaving early (or being cancelled) aborts it."""
        stream = self.add_request(request_id, prompt, params, add_special_tokens, lora_request=lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str, error: BaseException | None = None) -> None:
        """Abort a request (unknown or finished ids are ignored); its KV blocks are freed before the next step.

        A reader still iterating its stream gets `error` (default: RequestAbortedError).
        """
        stream = self._streams.get(request_id)
        if stream is None:
            return
        unfinished = self.output_processor.abort_requests([request_id])
        if unfinished:
            self.engine_core.abort_requests(unfinished)
        child_ids = self._forget(request_id)
        stream.put_error(error if error is not None else RequestAbortedError(f"request {request_id} was aborted"))
        self._record(None, self.stats_tracker.finish(child_ids, "abort", time.monotonic()))
        if self.log_requests:
            logger.info("Aborted request %s", request_id)

    def _check_fits_kv_cache(self, request: Request) -> None:
        # The scheduler would refuse it on its thread; say it here, where it becomes a 400.
        cache_config = self.config.cache_config
        max_model_len = self.config.scheduler_config.max_model_len
        num_tokens = max_kv_tokens(request, max_model_len)
        if cdiv(num_tokens, cache_config.block_size) > cache_config.num_blocks:
            raise ValueError(
                f"This request may need KV cache for {num_tokens} tokens (prompt {request.num_prompt_tokens}, "
                f"max_tokens {request.max_tokens}) but the KV cache holds "
                f"{cache_config.num_blocks * cache_config.block_size}; lower max_tokens."
            )

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine failed: {self.dead_error}")
        if not self.engine_core.is_alive():
            raise EngineDeadError("the engine core is not running")

    def _forget(self, request_id: str) -> list[str]:
        self._streams.pop(request_id, None)
        child_ids = self._child_ids.pop(request_id, [])
        for child_id in child_ids:
            self._parent_of.pop(child_id, None)
        return child_ids

    # -- outputs (on the event loop) ----------------------------------------------------------------------------
    def _on_core_outputs(self, batch: EngineCoreOutputs) -> None:
        """Called on the engine core's thread: move the batch to the event loop."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._process_batch, batch)

    def _process_batch(self, batch: EngineCoreOutputs) -> None:
        if batch.engine_error is not None:
            self._fail_all(batch.engine_error)
            return
        try:
            for child_id, message in batch.failed_requests.items():
                self._fail_request(self._parent_of.get(child_id), ValueError(message))
            request_outputs, stopped_ids = self.output_processor.process_outputs(batch.outputs)
            if stopped_ids:
                # A stop string ended them; the core does not see text and would keep going.
                self.engine_core.abort_requests(stopped_ids, RequestStatus.FINISHED_STOPPED)
            for output in request_outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                stream.put(output)
                if output.finished:
                    self._forget(output.request_id)
                    if self.log_requests:
                        logger.info("Finished request %s", output.request_id)
            iteration_stats = self.stats_tracker.update(batch.outputs, stopped_ids, time.monotonic())
            self._record(batch.scheduler_stats, iteration_stats)
        except Exception as e:  # noqa: BLE001 (the frontend's state is now unknown: stop serving, loudly)
            logger.exception("processing engine outputs failed")
            self.engine_core.shutdown()
            self._fail_all(f"processing engine outputs failed: {type(e).__name__}: {e}")

    def _fail_request(self, request_id: str | None, error: BaseException) -> None:
        if request_id is not None:
            self.abort(request_id, error)

    def _fail_all(self, reason: str) -> None:
        """The engine died: every request in flight ends with EngineDeadError; later ones are refused."""
        if self.dead_error is None:
            self.dead_error = reason
            logger.error("engine failed, failing %d requests in flight: %s", len(self._streams), reason)
        for request_id, stream in list(self._streams.items()):
            child_ids = self._forget(request_id)
            self._record(None, self.stats_tracker.finish(child_ids, "abort", time.monotonic()))
            stream.put_error(EngineDeadError(f"the engine failed: {reason}"))

    def _record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration_stats)

    # -- engine-wide ----------------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Raise EngineDeadError unless the engine can serve."""
        self._check_alive()

    def get_num_unfinished_requests(self) -> int:
        """User requests in flight."""
        return len(self._streams)

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache between two steps; False while requests hold KV blocks."""
        self._check_alive()
        return bool(await asyncio.wrap_future(self.engine_core.call_utility("reset_prefix_cache")))

    async def run_stat_logging(self, interval: float) -> None:
        """Forever: every `interval` seconds, let each stat logger report (the periodic log line)."""
        while True:
            await asyncio.sleep(interval)
            for stat_logger in self.stat_loggers:
                stat_logger.log()

    def shutdown(self) -> None:
        """Abort whatever is still in flight and stop the engine core."""
        for request_id in list(self._streams):
            self.abort(request_id, RequestAbortedError("the server is shutting down"))
        self.engine_core.shutdown()
