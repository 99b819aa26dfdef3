"""Orchestrates one step on the device: persistent request state → batch → forward → sample → plain lists."""
from __future__ import annotations

import logging

import torch

from graphserve.attention.backends.registry import select_attn_backend
from graphserve.attention.forward_context import set_forward_context
from graphserve.buffers import StagedBuffer
from graphserve.compile.cuda_graph import create_graph_runner
from graphserve.compile.wrapper import create_forward_fn
from graphserve.config import CompilationLevel, EngineConfig
from graphserve.core.scheduler_output import LogprobsLists, ModelRunnerOutput, SchedulerOutput
from graphserve.layers.attention import bind_attention_backend
from graphserve.lora.manager import create_adapter_manager
from graphserve.models.loader import get_model
from graphserve.platforms import get_platform
from graphserve.sample import Sampler, SamplerOutput, build_sampling_metadata, compute_topk_logprobs
from graphserve.sample.rejection_sampler import RejectionSampler
from graphserve.spec_decode.draft_model import DraftModelProposer
from graphserve.spec_decode.proposer import create_proposer
from graphserve.worker.async_output import AsyncModelRunnerOutput
from graphserve.worker.input_batch import BatchInputs, CachedRequestState, InputBatch, uniform_layout
from graphserve.worker.kv_cache import (
    allocate_kv_caches,
    determine_num_blocks,
    kv_cache_bytes_per_block,
    kv_cache_torch_dtype,
)
from graphserve.worker.memory_profiler import (
    dummy_forward,
    dummy_sampler_run,
    model_weight_bytes,
    profile_kv_cache_memory,
)

logger = logging.getLogger(__name__)


def log_kv_cache_scales(model: torch.nn.Module, cache_dtype: str) -> None:
    """Say which FP8 KV cache scales the checkpoint provided; warn when e4m3 runs on the default 1.0."""
    from graphserve.layers.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    loaded = sum(1 for m in layers if m.kv_scales_loaded == {"k", "v"})
    logger.info("FP8 KV cache (%s): k/v scales from the checkpoint for %d of %d layers", cache_dtype, loaded,
                len(layers))
    if loaded < len(layers) and cache_dtype != "fp8_e5m2":
        logger.warning("Using KV cache scaling factor 1.0 for fp8_e4m3 in %d layers without checkpoint scales; "
                       "this may cause accuracy issues (calibrated k_scale / v_scale are recommended)",
                       len(layers) - loaded)


class ModelRunner:
    """Owns the model, the KV caches and the per-request state; turns SchedulerOutput into ModelRunnerOutput.

    One input path: `InputBatch` (host arrays) → the model inputs' persistent buffers and the attention
    backend's metadata → a graph replay (decode steps that fit a bucket) or the compiled / eager forward.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.platform = get_platform(config.device_config.platform)
        self.device = self.platform.device()
        self.pin_memory = self.platform.capabilities.supports_pin_memory
        self.dtype = getattr(torch, self.model_config.dtype)
        self.block_size = config.cache_config.block_size
        sched = config.scheduler_config
        self.max_num_tokens = sched.max_num_batched_tokens
        self.requests: dict[str, CachedRequestState] = {}
        self.input_batch = InputBatch(self.block_size, max_num_reqs=sched.max_num_seqs,
                                      max_blocks_per_req=-(-sched.max_model_len // self.block_size))
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.model_config.seed)
        # The last launched step: with async scheduling its sampled tokens may still be on the device.
        self._last_output: AsyncModelRunnerOutput | None = None
        # Registers the platform's device kernels (Triton on CUDA/ROCm) before anything runs the model.
        self.kernel_choices = self.platform.kernel_choices()
        self.attn_backend = select_attn_backend(self.platform, config.device_config.attention_backend)
        self.attn_backend.validate(self.model_config.head_dim, self.dtype)
        # The KV pool's element type: the model dtype, or FP8 (half the bytes per token, scales per layer).
        self.kv_cache_dtype = kv_cache_torch_dtype(config.cache_config.cache_dtype, self.dtype)
        self.attn_backend.validate_kv_cache_dtype(self.kv_cache_dtype, self.dtype)
        self.model = get_model(self.model_config, self.device)
        logger.info("model weights: %.1f MiB on %s (quantization: %s)", model_weight_bytes(self.model) / (1 << 20),
                    self.device, self.model_config.quantization or "none")
        bind_attention_backend(self.model, self.attn_backend)
        if self.kv_cache_dtype != self.dtype:
            log_kv_cache_scales(self.model, config.cache_config.cache_dtype)
        # A decode step holds up to max_num_seqs tokens, a mixed step up to max_num_batched_tokens.
        max_tokens = max(self.max_num_tokens, sched.max_num_seqs)
        self.attn_metadata_builder = self.attn_backend.get_builder_cls()(
            self.block_size, sched.max_num_seqs, max_tokens, sched.max_model_len, self.device, self.pin_memory)
        # LoRA adapters (a no-op component when LoRA is off): wraps the projections before compile and capture.
        self.adapters = create_adapter_manager(self.model, self.model_config, config.lora_config, max_tokens,
                                               self.device, self.dtype, self.pin_memory)
        # Speculative decoding (None when off): drafts proposed after each step, verified by the next one; a draft
        # model brings its own weights, KV pool (indexed by the same block tables) and graphs.
        spec = config.speculative_config
        self.draft = None
        if spec is not None and spec.method == "draft_model":
            self.draft = DraftModelProposer(config, spec.draft_model_config, self.platform, self.kernel_choices,
                                            self.attn_backend, self.device, self.pin_memory, max_tokens)
        self.proposer = create_proposer(spec, self.draft, self.input_batch)
        self.input_ids = StagedBuffer((max_tokens,), torch.int64, self.device, self.pin_memory)
        self.positions = StagedBuffer((max_tokens,), torch.int64, self.device, self.pin_memory)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.compilation_config = config.compilation_config
        self.forward_fn = create_forward_fn(self.model, self.compilation_config)
        # With speculative decoding, verify steps (1 + k query tokens per request) get graphs of their own.
        self.graph_runner = create_graph_runner(
            self.compilation_config, self.platform, self.kernel_choices, self.attn_backend,
            hidden_size=self.model_config.hidden_size, dtype=self.dtype, device=self.device,
            verify_query_len=1 + (spec.num_speculative_tokens if spec is not None else 0),
            verify_max_reqs=spec.disable_by_batch_size if spec is not None else None, max_num_tokens=max_tokens,
        )

    def initialize_kv_cache(self) -> int:
        """Size and allocate the KV pool from the memory budget; returns the number of blocks."""
        cc = self.config.cache_config
        block_bytes = kv_cache_bytes_per_block(self.model_config, self.block_size, self.kv_cache_dtype,
                                               self.attn_backend)
        if self.draft is not None:  # the draft's pool has as many blocks
            block_bytes += self.draft.kv_cache_bytes_per_block()
        self.num_blocks = determine_num_blocks(
            self.model_config, cc, self.config.scheduler_config, block_bytes, self._kv_cache_budget()
        )
        self.kv_caches = allocate_kv_caches(self.model_config, self.num_blocks, self.block_size, self.kv_cache_dtype,
                                            self.device, self.attn_backend)
        logger.info("KV cache: %d blocks of %d tokens (%s attention)", self.num_blocks, self.block_size,
                    self.attn_backend.name)
        self.compile_or_warm_up_model()
        return self.num_blocks

    @torch.inference_mode()  # the mode serving runs in: compiling in another would compile a second graph
    def _kv_cache_budget(self) -> int:
        """Bytes the KV pool may take: profiled on GPUs, the platform's fixed share elsewhere."""
        cc = self.config.cache_config
        explicit = cc.num_blocks is not None or cc.kv_cache_memory is not None
        if explicit or not self.platform.capabilities.supports_memory_profiling:
            return self.platform.default_kv_cache_memory(self.device, cc.gpu_memory_utilization)
        max_len = self.config.scheduler_config.max_model_len
        # Compile (if enabled) before measuring, so the compiler's own allocations are not taken for activations.
        dummy_forward(self.forward_fn, 2, max_len, self.device)
        spec = self.config.speculative_config
        rows_per_req = 1 + (spec.num_speculative_tokens if spec is not None else 0)  # scored positions per request
        num_reqs = min(self.config.scheduler_config.max_num_seqs * rows_per_req, self.max_num_tokens)

        def max_step() -> None:
            hidden_states = dummy_forward(self.forward_fn, self.max_num_tokens, max_len, self.device)
            dummy_sampler_run(self.model, self.sampler, hidden_states, num_reqs, self.device, self.pin_memory)
            if self.draft is not None:
                self.draft.profile_run()

        graph_batch = None
        if self.graph_runner is not None:
            size = self.graph_runner.max_num_tokens
            graph_batch = lambda: dummy_forward(self.forward_fn, size, max_len, self.device)  # noqa: E731
        profile = profile_kv_cache_memory(self.platform, self.device, cc.gpu_memory_utilization,
                                          model_weight_bytes(self.model), max_step, graph_batch)
        return profile.kv_cache_bytes

    @torch.inference_mode()
    def compile_or_warm_up_model(self) -> None:
        """Compile the forward now rather than on the first request, and capture the decode (and verify) graphs;
        the same for the draft model, with its KV pool."""
        if self.draft is not None:
            self.draft.initialize(self.num_blocks)
        if self.graph_runner is not None:
            free_before, _ = self.platform.mem_get_info(self.device)
            self.graph_runner.capture(self._graph_step)
            self.platform.synchronize(self.device)
            free_after, _ = self.platform.mem_get_info(self.device)
            logger.info("graphs hold %.2f GiB", (free_before - free_after) / (1 << 30))
        elif self.compilation_config.level != CompilationLevel.NO_COMPILATION:
            dummy_forward(self.forward_fn, 2, self.config.scheduler_config.max_model_len, self.device)

    def _graph_step(self, size: int, query_len: int = 1):
        """The forward a graph of `size` requests of `query_len` tokens each captures: static inputs, the backend's
        capture metadata."""
        attn_metadata = self.attn_metadata_builder.build_for_capture(size, query_len)
        num_tokens = size * query_len
        self.adapters.prepare_capture(num_tokens)
        input_ids, positions = self.input_ids.device[:num_tokens], self.positions.device[:num_tokens]
        kv_caches, forward_fn = self.kv_caches, self.forward_fn

        def step() -> torch.Tensor:  # [size, hidden_size]
            with set_forward_context(attn_metadata, kv_caches):
                return forward_fn(input_ids, positions)

        return step

    def _update_states(self, so: SchedulerOutput) -> None:
        """Apply the scheduler's changes: drop finished/preempted requests, add new ones, extend block tables."""
        for req_id in so.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.input_batch.release(state)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids),
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                lora_request=new.lora_request,
            )
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> AsyncModelRunnerOutput:
        """Queue one step on the device and return without waiting for it.

        The previous step may still be running: a decode token it samples is read from its device tensor.
        A request whose sampling reads its generated tokens (penalties, seed, ...) first waits for them.
        """
        self._update_states(so)
        if so.is_empty:
            return AsyncModelRunnerOutput.ready(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        order = [r.req_id for r in so.scheduled_new_reqs] + [r.req_id for r in so.scheduled_cached_reqs]
        states = [self.requests[rid] for rid in order]
        num_scheduled = [so.num_scheduled_tokens[rid] for rid in order]
        last = self._last_output
        if last is not None and not last.done and any(
                st.needs_output_token_ids and st.req_id in last.row_of_request for st in states):
            last.get_output()
        pending = last.row_of_request if last is not None and not last.done else {}
        spec = so.scheduled_spec_decode_tokens
        spec_tokens = [spec.get(rid, []) for rid in order] if spec else None
        batch = self.input_batch.prepare(states, num_scheduled, pending, spec_tokens)
        graph_key = self._graph_key(batch)
        if graph_key is not None and graph_key[1] > 1:  # a verify graph: every request on 1 + k rows
            batch = uniform_layout(batch, graph_key[1])
        hidden_states = self._forward(batch, graph_key, last.sampled_token_ids if pending else None,
                                      [st.lora_request for st in states])
        sampler_output = self._sample(states, batch, hidden_states)
        output = ModelRunnerOutput(req_ids=batch.req_ids, sampled_token_ids=[[] for _ in states])
        self._compute_prompt_logprobs(states, batch, hidden_states, output)
        for st, n in zip(states, num_scheduled):
            st.num_computed_tokens += n
        on_ready = self.proposer.propose_for_step if self.proposer is not None else None
        result = self._last_output = AsyncModelRunnerOutput(output, states, batch.sampling_req_indices,
                                                            sampler_output, self.platform, on_ready)
        return result

    def _graph_key(self, batch: BatchInputs) -> tuple[int, int] | None:
        """(padded requests, query rows per request) of the graph that serves this step, or None."""
        if self.graph_runner is None or not batch.num_reqs:
            return None
        key = self.graph_runner.graph_key(batch.num_reqs, batch.num_tokens, int(batch.query_lens.max()))
        if key is not None and key[1] > 1:
            # Padding a request's rows lengthens its context: it must stay inside max_model_len (the block table).
            prefix = int((batch.seq_lens - batch.query_lens).max())
            if prefix + key[1] > self.config.scheduler_config.max_model_len:
                return None
        return key

    def _forward(self, batch: BatchInputs, graph_key: tuple[int, int] | None, last_sampled: torch.Tensor | None,
                 lora_requests: list) -> torch.Tensor:
        """The model forward over the flat token dimension (a graph replay when `graph_key` names one, the batch
        then in that graph's layout); returns hidden states [num_tokens, hidden]."""
        num_tokens = batch.num_tokens
        num_input = graph_key[0] * graph_key[1] if graph_key is not None else num_tokens
        self.adapters.prepare_step(lora_requests, batch.query_lens, num_tokens, num_input)
        self.input_ids.np[:num_tokens] = batch.input_ids
        self.positions.np[:num_tokens] = batch.positions
        if graph_key is not None:  # padded rows: token 0 at position 0
            self.input_ids.np[num_tokens:num_input] = 0
            self.positions.np[num_tokens:num_input] = 0
        input_ids = self.input_ids.upload(num_input)
        positions = self.positions.upload(num_input)
        if len(batch.prev_token_indices):
            # Decode inputs sampled by the step still in flight: gathered on the device, never via the host.
            rows = torch.from_numpy(batch.prev_token_rows).to(self.device, non_blocking=True)
            indices = torch.from_numpy(batch.prev_token_indices).to(self.device, non_blocking=True)
            input_ids.index_copy_(0, indices, last_sampled.index_select(0, rows))
        if graph_key is not None:
            self.attn_metadata_builder.prepare_for_replay(batch, *graph_key)
            return self.graph_runner.replay(*graph_key)[:num_tokens]
        attn_metadata = self.attn_metadata_builder.build(batch)
        with set_forward_context(attn_metadata, self.kv_caches):
            return self.forward_fn(input_ids, positions)

    def _sample(
        self, states: list[CachedRequestState], batch: BatchInputs, hidden_states: torch.Tensor
    ) -> SamplerOutput | None:
        """Sample, on the device, the requests whose known tokens are all computed (partial prefills get none)."""
        if not batch.sampling_req_indices:
            return None
        sampling_states = [states[i] for i in batch.sampling_req_indices]
        if len(batch.logits_indices) == hidden_states.shape[0]:
            # Every token is a sampling position (a pure decode step): the indices are 0..n-1.
            sample_hidden_states = hidden_states
        else:
            indices = torch.from_numpy(batch.logits_indices).to(self.device, non_blocking=True)
            sample_hidden_states = hidden_states.index_select(0, indices)
        logits = self.model.compute_logits(sample_hidden_states)
        if batch.spec_token_ids is not None:  # a verify step: k + 1 scored positions per request with drafts
            return self.rejection_sampler(logits, [st.sampling for st in sampling_states], batch.spec_token_ids,
                                          self.generator, self.pin_memory)
        metadata = build_sampling_metadata(
            [st.sampling for st in sampling_states], logits.shape[-1], self.device, self.generator, self.pin_memory
        )
        return self.sampler(logits, metadata)

    def _compute_prompt_logprobs(
        self,
        states: list[CachedRequestState],
        batch: BatchInputs,
        hidden_states: torch.Tensor,
        out: ModelRunnerOutput,
    ) -> None:
        """Logprobs of prompt tokens 1..P-1 covered by this chunk (the first prompt token has none)."""
        for i, st in enumerate(states):
            k = st.sampling_params.prompt_logprobs
            start = st.num_computed_tokens
            num_prompt = len(st.prompt_token_ids)
            if k is None or start >= num_prompt - 1:
                continue
            end = min(start + int(batch.query_lens[i]), num_prompt - 1)
            first = int(batch.query_start_loc[i])
            logits = self.model.compute_logits(hidden_states[first : first + end - start])
            targets = torch.tensor(st.prompt_token_ids[start + 1 : end + 1], device=self.device)
            ids, lps, ranks = compute_topk_logprobs(logits.log_softmax(dim=-1), targets, k)
            out.prompt_logprobs[st.req_id] = (start + 1, LogprobsLists(ids.tolist(), lps.tolist(), ranks.tolist()))
