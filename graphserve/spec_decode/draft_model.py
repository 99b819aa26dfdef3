"""A small draft model that proposes k tokens per request per step, greedily, with its own paged KV cache and its
own decode graphs.

The draft's KV pool has as many blocks as the target's and is indexed by the same block tables, so the scheduler's
allocation serves both (it reserves `num_speculative_tokens` lookahead slots past a speculating request's step,
where the draft writes its speculative positions). After each target step, for every request of the step:
1. catch-up: the draft runs over the request's positions it has not seen with true tokens yet ([c, N), N its
   known tokens; a prefill chunk the target computed, or the accepted tokens plus the bonus token), as varlen
   batches of at most `max_num_tokens` tokens; the logits at position N - 1 give the first draft;
2. k - 1 decode steps over the proposing requests, each feeding the previous draft at the next position (a graph
   replay per step where graphs are on); the argmax is the next draft.
Drafting greedily makes the proposal distribution one-hot, which the rejection sampler verifies exactly for any
sampling of the target (vLLM's EAGLE / draft path does the same). The positions >= N hold draft tokens' KV and are
recomputed by the next catch-up, which starts at N (`CachedRequestState.num_draft_computed`). A request that
(re)starts (new, or resumed after preemption) starts at 0: the draft never trusts prefix-cached blocks, whose draft
KV may be missing. Only acceptance depends on the drafts; the output never does.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from graphserve.attention.backends.base import PAD_SLOT_ID, AttentionInputs
from graphserve.attention.forward_context import set_forward_context
from graphserve.buffers import StagedBuffer
from graphserve.compile.cuda_graph import create_graph_runner
from graphserve.compile.wrapper import create_forward_fn
from graphserve.config import CompilationLevel
from graphserve.layers.attention import bind_attention_backend
from graphserve.models.loader import get_model
from graphserve.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block, kv_cache_torch_dtype
from graphserve.worker.memory_profiler import dummy_forward

if TYPE_CHECKING:
    from graphserve.attention.backends.base import AttentionBackend
    from graphserve.config import EngineConfig, ModelConfig
    from graphserve.platforms.interface import Platform
    from graphserve.platforms.kernels import KernelChoice
    from graphserve.worker.input_batch import CachedRequestState

logger = logging.getLogger(__name__)


class DraftModelProposer:
    """The draft model, its KV caches and input buffers, and the batched proposal of every step."""

    def __init__(self, config: EngineConfig, draft_config: ModelConfig, platform: Platform,
                 kernel_choices: dict[str, KernelChoice], attn_backend: type[AttentionBackend], device: torch.device,
                 pin_memory: bool, max_num_tokens: int) -> None:
        self.k = config.speculative_config.num_speculative_tokens
        self.model_config = draft_config
        self.platform = platform
        self.device = device
        self.dtype = getattr(torch, draft_config.dtype)
        self.block_size = config.cache_config.block_size
        self.max_model_len = config.scheduler_config.max_model_len
        self.max_num_tokens = max_num_tokens
        self.attn_backend = attn_backend
        attn_backend.validate(draft_config.head_dim, self.dtype)
        self.kv_cache_dtype = kv_cache_torch_dtype(config.cache_config.cache_dtype, self.dtype)  # scales 1.0
        self.model = get_model(draft_config, device)
        bind_attention_backend(self.model, attn_backend)
        max_num_reqs = config.scheduler_config.max_num_seqs
        self.builder = attn_backend.get_builder_cls()(self.block_size, max_num_reqs, max_num_tokens,
                                                      self.max_model_len, device, pin_memory)
        self.input_ids = StagedBuffer((max_num_tokens,), torch.int64, device, pin_memory)
        self.positions = StagedBuffer((max_num_tokens,), torch.int64, device, pin_memory)
        self.forward_fn = create_forward_fn(self.model, config.compilation_config)
        self.compiled = config.compilation_config.level != CompilationLevel.NO_COMPILATION
        self.graph_runner = create_graph_runner(config.compilation_config, platform, kernel_choices, attn_backend,
                                                hidden_size=draft_config.hidden_size, dtype=self.dtype,
                                                device=device)
        self.kv_caches: list[torch.Tensor] = []

    # -- start-up ---------------------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block of the draft's pool occupies (the target's pool has as many blocks)."""
        return kv_cache_bytes_per_block(self.model_config, self.block_size, self.kv_cache_dtype, self.attn_backend)

    def profile_run(self) -> None:
        """The draft's largest forward (memory profiling): a catch-up batch of max_num_tokens tokens."""
        dummy_forward(self.forward_fn, self.max_num_tokens, self.max_model_len, self.device)

    def initialize(self, num_blocks: int) -> None:
        """Allocate the draft's KV pool (as many blocks as the target's), compile, capture its decode graphs."""
        self.kv_caches = allocate_kv_caches(self.model_config, num_blocks, self.block_size, self.kv_cache_dtype,
                                            self.device, self.attn_backend)
        if self.graph_runner is not None:
            self.graph_runner.capture(self._graph_step)
        elif self.compiled:
            dummy_forward(self.forward_fn, 2, self.max_model_len, self.device)

    def _graph_step(self, size: int, query_len: int = 1) -> Callable[[], torch.Tensor]:
        attn_metadata = self.builder.build_for_capture(size, query_len)
        input_ids, positions = self.input_ids.device[:size], self.positions.device[:size]
        kv_caches, forward_fn = self.kv_caches, self.forward_fn

        def step() -> torch.Tensor:
            with set_forward_context(attn_metadata, kv_caches):
                return forward_fn(input_ids, positions)

        return step

    # -- each step ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, states: list[CachedRequestState], block_table: np.ndarray,
                proposing: list[bool]) -> dict[str, list[int]]:
        """Catch every request of `states` up with its known tokens, then draft for those marked `proposing`
        (they sampled this step and may speculate); returns {req_id: drafts}."""
        segments = []  # (state, first position, end, proposes)
        for st, wants in zip(states, proposing):
            end = st.num_tokens if wants else st.num_computed_tokens
            # Only allocated slots are written: a request whose last token has no slot yet (a prefill that filled
            # its blocks) catches up to its capacity and drafts next step.
            capped = min(end, len(st.block_ids) * self.block_size)
            if capped > st.num_draft_computed:
                segments.append((st, st.num_draft_computed, capped, wants and capped == end))
        first_drafts = self._catch_up(segments, block_table)  # {state index in segments: device scalar}
        drafting = []  # (state, number of drafts)
        for i, (st, _, end, wants) in enumerate(segments):
            st.num_draft_computed = end
            if wants and i in first_drafts:
                capacity = len(st.block_ids) * self.block_size
                # Draft j >= 2 is computed from a write at position N + j - 2: it must have a slot and a position.
                num = min(self.k, capacity - end + 1, self.max_model_len - end + 1)
                if st.sampling_params.max_tokens is not None:
                    num = min(num, st.sampling_params.max_tokens - len(st.output_token_ids) - 1)
                if num > 0:
                    drafting.append((st, num, first_drafts[i]))
        if not drafting:
            return {}
        drafts = self._decode_drafts(drafting, block_table)  # [num drafting, k] on the device
        rows = drafts.tolist()
        return {st.req_id: row[:num] for (st, num, _), row in zip(drafting, rows)}

    def _catch_up(self, segments: list, block_table: np.ndarray) -> dict[int, torch.Tensor]:
        """Run the draft over every segment (split into forwards of at most max_num_tokens tokens); returns the
        greedy first draft of each proposing segment, by segment index."""
        first: dict[int, torch.Tensor] = {}
        pieces: list[tuple[int, int, int]] = []  # (segment index, start, end)
        budget = self.max_num_tokens
        for i, (_, start, end, _) in enumerate(segments):
            while start < end:
                if budget == 0:
                    self._forward_pieces(segments, pieces, block_table, first)
                    pieces, budget = [], self.max_num_tokens
                take = min(end - start, budget)
                pieces.append((i, start, start + take))
                budget -= take
                start += take
        if pieces:
            self._forward_pieces(segments, pieces, block_table, first)
        return first

    def _forward_pieces(self, segments: list, pieces: list[tuple[int, int, int]], block_table: np.ndarray,
                        first: dict[int, torch.Tensor]) -> None:
        """One varlen forward of the draft over `pieces`; the argmax at the last token of each piece that ends a
        proposing segment is recorded in `first`."""
        ids: list[int] = []
        query_lens, seq_lens, rows = [], [], []
        for i, start, end in pieces:
            st = segments[i][0]
            ids.extend(st.token_at(start, end))
            query_lens.append(end - start)
            seq_lens.append(end)
            rows.append(st.table_row)
        query_lens_np = np.asarray(query_lens, dtype=np.int64)
        query_start_loc = np.zeros(len(pieces) + 1, dtype=np.int32)
        np.cumsum(query_lens_np, out=query_start_loc[1:])
        seq_lens_np = np.asarray(seq_lens, dtype=np.int64)
        positions = (np.repeat(seq_lens_np - query_lens_np, query_lens_np)
                     + np.arange(len(ids), dtype=np.int64) - np.repeat(query_start_loc[:-1], query_lens_np))
        rows_np = np.asarray(rows, dtype=np.int64)
        token_rows = np.repeat(rows_np, query_lens_np)
        bs = self.block_size
        slots = block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        width = int((seq_lens_np.max() + bs - 1) // bs)
        inputs = AttentionInputs(query_start_loc=query_start_loc, seq_lens=seq_lens_np.astype(np.int32),
                                 block_table=block_table[rows_np, :width], slot_mapping=slots)
        n = len(ids)
        self.input_ids.np[:n] = ids
        self.positions.np[:n] = positions
        input_ids, positions_dev = self.input_ids.upload(n), self.positions.upload(n)
        with set_forward_context(self.builder.build(inputs), self.kv_caches):
            hidden = self.forward_fn(input_ids, positions_dev)
        last = [(j, i) for j, (i, _, end) in enumerate(pieces) if segments[i][3] and end == segments[i][2]]
        if last:
            index = torch.tensor([int(query_start_loc[j + 1]) - 1 for j, _ in last], device=self.device)
            tokens = self.model.compute_logits(hidden.index_select(0, index)).argmax(dim=-1)
            for row, (_, i) in enumerate(last):
                first[i] = tokens[row]
        self._sync_staging()

    def _decode_drafts(self, drafting: list, block_table: np.ndarray) -> torch.Tensor:  # [num drafting, k]
        """Drafts 2..k: k - 1 decode steps of the draft over the drafting requests (graph replays where captured).
        A request with fewer drafts writes nowhere past its last one (slot -1)."""
        b = len(drafting)
        out = torch.empty(b, self.k, dtype=torch.int64, device=self.device)
        out[:, 0] = torch.stack([tok for _, _, tok in drafting])
        ends = np.asarray([st.num_tokens for st, _, _ in drafting], dtype=np.int64)
        nums = np.asarray([num for _, num, _ in drafting], dtype=np.int64)
        rows = np.asarray([st.table_row for st, _, _ in drafting], dtype=np.int64)
        bs = self.block_size
        graph_size = self.graph_runner.padded_size(b, b) if self.graph_runner is not None else None
        for j in range(2, self.k + 1):
            positions = ends + j - 2  # where draft j - 1 is written
            live = nums >= j
            if not live.any():
                break
            width = int((positions[live].max() + bs) // bs)
            safe = np.where(live, positions, 0)
            slots = np.where(live, block_table[rows, safe // bs].astype(np.int64) * bs + safe % bs, PAD_SLOT_ID)
            inputs = AttentionInputs(query_start_loc=np.arange(b + 1, dtype=np.int32),
                                     seq_lens=np.where(live, positions + 1, 1).astype(np.int32),
                                     block_table=block_table[rows, :width], slot_mapping=slots)
            num_input = graph_size or b
            self.positions.np[:b] = np.where(live, positions, 0)
            self.positions.np[b:num_input] = 0
            positions_dev = self.positions.upload(num_input)
            input_ids = self.input_ids.device[:num_input]
            input_ids[:b].copy_(out[:, j - 2])
            if graph_size is not None:
                input_ids[b:].zero_()
                self.builder.prepare_for_replay(inputs, graph_size)
                hidden = self.graph_runner.replay(graph_size)[:b]
            else:
                with set_forward_context(self.builder.build(inputs), self.kv_caches):
                    hidden = self.forward_fn(input_ids, positions_dev)
            out[:, j - 1] = self.model.compute_logits(hidden).argmax(dim=-1)
            self._sync_staging()
        return out

    def _sync_staging(self) -> None:
        """Wait for the device before the next forward stages its inputs: the host staging copies alternate, and
        a third forward queued back to back would overwrite one whose upload may still be pending."""
        self.platform.synchronize(self.device)


def check_draft_model(target: ModelConfig, draft: ModelConfig) -> None:
    """ValueError unless the draft can propose for the target: the same vocabulary, the context it needs."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config.model: the draft model's vocabulary ({draft.vocab_size} tokens) "
                         f"differs from the target's ({target.vocab_size}); the draft must share its tokenizer")
    if draft.max_model_len < target.max_model_len:
        raise ValueError(f"speculative_config.model: the draft model's context ({draft.max_model_len}) is shorter "
                         f"than max_model_len ({target.max_model_len}); lower --max-model-len")
