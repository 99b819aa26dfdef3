"""LLMEngine: the synchronous engine used by the offline `LLM` (and, through a thread, by the server)."""
from __future__ import annotations

import logging
from typing import Any

from graphserve.config import EngineConfig
from graphserve.core.request import RequestStatus
from graphserve.engine.arg_utils import EngineArgs
from graphserve.engine.engine_core import EngineCore
from graphserve.engine.input_processor import InputProcessor
from graphserve.engine.output_processor import OutputProcessor
from graphserve.engine.tokenizer import get_tokenizer
from graphserve.lora.request import LoRARequest
from graphserve.outputs import RequestOutput
from graphserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Strings in, RequestOutputs out: input processing → engine core → output processing."""

    def __init__(self, config: EngineConfig, chat_template: str | None = None) -> None:
        mc = config.model_config
        # A GGUF model carries its own tokenizer; an explicit tokenizer directory is a plain HF one.
        gguf_file = mc.gguf_file if mc.tokenizer == mc.model else None
        self.tokenizer = get_tokenizer(mc.tokenizer, gguf_file=gguf_file, chat_template=chat_template)
        self.input_processor = InputProcessor(mc, self.tokenizer, config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = EngineCore(config)
        self.config = self.engine_core.config
        self.model_config = mc

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        """Build the whole engine from user settings."""
        return cls(engine_args.create_engine_config(), chat_template=engine_args.chat_template)

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        arrival_time: float | None = None,
        add_special_tokens: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue one prompt (text, token ids or a dict), through `lora_request`'s adapter if given;
        raises ValueError on bad input."""
        if request_id in self.output_processor.request_states:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = self.input_processor.process_inputs(
            request_id, prompt, params, arrival_time=arrival_time, add_special_tokens=add_special_tokens,
            lora_request=lora_request,
        )
        first = children[0]
        self.output_processor.add_request(
            request_id,
            self.input_processor.get_prompt_text(prompt),
            first.prompt_token_ids,
            params,
            [c.request_id for c in children],
            first.arrival_time,
        )
        added = []
        try:
            for child in children:
                self.engine_core.add_request(child)
                added.append(child.request_id)
        except ValueError:
            self.engine_core.abort_requests(added)
            self.output_processor.abort_requests([request_id])
            raise

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests by their user-facing ids; their KV blocks are freed at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        child_ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(child_ids)

    def step(self) -> list[RequestOutput]:
        """Run one engine iteration and return the outputs ready for their callers."""
        core_outputs = self.engine_core.step()
        request_outputs, stopped_ids = self.output_processor.process_outputs(core_outputs)
        if stopped_ids:
            # A stop string ended these: free their blocks before the next schedule.
            self.engine_core.abort_requests(stopped_ids, RequestStatus.FINISHED_STOPPED)
        return request_outputs

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (e.g. after a weight update); False, with nothing done, while busy."""
        return self.engine_core.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()
