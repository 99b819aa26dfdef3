"""CUDA/HIP graphs for decode and verify steps: one graph per (batch bucket, query length), captured at start-up.

A decode step (every request schedules exactly one token) of n requests is padded to the smallest bucket
>= n and served by replaying that bucket's graph. With speculative decoding a second family of graphs serves
verify steps: every request laid out on the same number of query rows, 1 + num_speculative_tokens (a request
with fewer drafts is padded inside its rows: `worker/input_batch.uniform_layout`), so one graph per bucket
scores all drafts. The runner only captures and replays: what a graph reads lives elsewhere, at fixed
addresses, and is rewritten before each replay —
- the model inputs (`input_ids`, `positions`) in the model runner's persistent buffers;
- the attention metadata in the attention backend's buffers (`build_for_capture` / `prepare_for_replay`).
The graphs' output (the hidden states) is the runner's own static buffer.

Graphs are captured largest first and share one memory pool, so smaller buckets reuse the largest one's
intermediate buffers. Steps with a longer query (prefill chunks) never use graphs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from graphserve.compile.counters import compilation_counter
from graphserve.config import CompilationConfig

if TYPE_CHECKING:
    from graphserve.attention.backends.base import AttentionBackend
    from graphserve.platforms.interface import DeviceGraph, Platform
    from graphserve.platforms.kernels import KernelChoice

logger = logging.getLogger(__name__)

# Builds the forward of one graph: called once per (capture size, query length), returns a function that runs the
# model on the static inputs of size * query_length token rows and returns their hidden states.
StepBuilder = Callable[[int, int], Callable[[], torch.Tensor]]


class GraphBuckets:
    """Bucket selection: the smallest capture size that holds a batch (a lookup table, O(1) per step)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"capture sizes must be positive, got {list(sizes)}")
        self.sizes = tuple(sorted(set(sizes)))
        self.max_size = self.sizes[-1]
        self._padded = np.zeros(self.max_size + 1, dtype=np.int64)
        bucket = 0
        for n in range(self.max_size, 0, -1):
            if n in self.sizes:
                bucket = n
            self._padded[n] = bucket

    def padded_size(self, num_reqs: int) -> int | None:
        """The bucket a batch of `num_reqs` pads to; None when it is empty or larger than every bucket."""
        if num_reqs < 1 or num_reqs > self.max_size:
            return None
        return int(self._padded[num_reqs])


class RerunGraph:
    """The DeviceGraph interface without a GPU: replay re-runs the captured function over the same buffers.

    It keeps everything the real graph relies on (static buffers, padding, metadata fixed at capture), so the
    bucket machinery can be tested end to end on the CPU; it is never chosen for serving.
    """

    def __init__(self, pool: object = None) -> None:
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None]) -> None:
        """Run `fn` once and remember it."""
        fn()
        self.fn = fn

    def replay(self) -> None:
        """Run the remembered function again."""
        assert self.fn is not None, "replay before capture"
        self.fn()


class CUDAGraphRunner:
    """One graph per decode bucket (one query row per request) and, with `verify_query_len` > 1, one per verify
    bucket (that many rows per request), over static inputs, plus the static buffer their hidden states land in.

    Verify buckets are the capture sizes of at most `verify_max_reqs` requests whose rows fit `max_num_tokens`.
    """

    def __init__(
        self,
        capture_sizes: Sequence[int],
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        create_graph: Callable[[object], DeviceGraph],
        pool: object = None,
        verify_query_len: int = 1,
        verify_max_reqs: int | None = None,
        max_num_tokens: int | None = None,
    ) -> None:
        self.buckets = GraphBuckets(capture_sizes)
        self.verify_query_len = verify_query_len
        self.verify_buckets: GraphBuckets | None = None
        if verify_query_len > 1:
            limit = verify_max_reqs or self.buckets.max_size
            if max_num_tokens is not None:
                limit = min(limit, max_num_tokens // verify_query_len)
            sizes = [s for s in self.buckets.sizes if s <= limit]
            self.verify_buckets = GraphBuckets(sizes) if sizes else None
        self.create_graph = create_graph
        self.pool = pool
        with torch.inference_mode():
            self.hidden_states = torch.zeros(self.max_num_tokens, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[tuple[int, int], DeviceGraph] = {}
        self.capture_seconds = 0.0

    @property
    def keys(self) -> list[tuple[int, int]]:
        """Every (batch size, query length) that gets a graph, largest token count first (the capture order)."""
        keys = [(s, 1) for s in self.buckets.sizes]
        if self.verify_buckets is not None:
            keys += [(s, self.verify_query_len) for s in self.verify_buckets.sizes]
        return sorted(keys, key=lambda k: (k[0] * k[1], k[1]), reverse=True)

    @property
    def max_num_tokens(self) -> int:
        """Token rows of the largest graph."""
        return max(s * q for s, q in self.keys)

    @property
    def num_graphs(self) -> int:
        """How many graphs are captured."""
        return len(self.graphs)

    @torch.inference_mode()
    def capture(self, build_step: StepBuilder) -> None:
        """Capture every graph, largest first, into one shared pool (after a warm-up run of each)."""
        start = time.perf_counter()
        for size, query_len in self.keys:
            step = build_step(size, query_len)
            out = self.hidden_states[: size * query_len]

            def run(step: Callable[[], torch.Tensor] = step, out: torch.Tensor = out) -> None:
                out.copy_(step())

            # The warm-up compiles/JITs kernels and lets libraries allocate workspaces outside the capture.
            run()
            graph = self.create_graph(self.pool)
            graph.capture(run)
            self.graphs[(size, query_len)] = graph
            compilation_counter.num_cudagraphs_captured += 1
        self.capture_seconds = time.perf_counter() - start
        verify = ""
        if self.verify_buckets is not None:
            verify = (f" and {len(self.verify_buckets.sizes)} verify graphs of {self.verify_query_len} rows per "
                      f"request (batch sizes {self.verify_buckets.sizes[0]}..{self.verify_buckets.max_size})")
        logger.info("captured %d decode graphs (batch sizes %d..%d)%s in %.1f s", len(self.buckets.sizes),
                    self.buckets.sizes[0], self.buckets.max_size, verify, self.capture_seconds)

    def padded_size(self, num_reqs: int, num_tokens: int) -> int | None:
        """The bucket of a decode-only step (one token per request) that fits; None for any other step."""
        if not self.graphs or num_tokens != num_reqs:
            return None
        return self.buckets.padded_size(num_reqs)

    def graph_key(self, num_reqs: int, num_tokens: int, max_query_len: int) -> tuple[int, int] | None:
        """(padded batch size, query rows per request) of the graph that serves a step, or None: a decode step
        takes a decode graph, a step whose requests each have at most `verify_query_len` tokens a verify graph."""
        size = self.padded_size(num_reqs, num_tokens)
        if size is not None:
            return size, 1
        if not self.graphs or self.verify_buckets is None or max_query_len > self.verify_query_len:
            return None
        size = self.verify_buckets.padded_size(num_reqs)
        return None if size is None else (size, self.verify_query_len)

    def replay(self, size: int, query_len: int = 1) -> torch.Tensor:  # [size * query_len, hidden_size]
        """Replay graph (size, query_len) (its inputs already written); returns its rows of the static output,
        valid until the next replay."""
        self.graphs[(size, query_len)].replay()
        compilation_counter.num_cudagraph_replays += 1
        if query_len > 1:
            compilation_counter.num_verify_graph_replays += 1
        return self.hidden_states[: size * query_len]


def create_graph_runner(
    compilation_config: CompilationConfig,
    platform: Platform,
    kernel_choices: dict[str, KernelChoice],
    attn_backend: type[AttentionBackend],
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
    verify_query_len: int = 1,
    verify_max_reqs: int | None = None,
    max_num_tokens: int | None = None,
) -> CUDAGraphRunner | None:
    """A graph runner when graphs are asked for and everything a decode step runs can be captured, else None.
    `verify_query_len` > 1 (speculative decoding) adds the verify graphs."""
    if not compilation_config.use_cudagraph:
        return None
    if not platform.capabilities.supports_graphs:
        logger.info("the %s platform has no graph capture: decode steps run without graphs", platform.name.value)
        return None
    # The attention router is as capturable as its backend; every other op by its own kernel.
    blockers = attn_backend.graph_blockers(kernel_choices) + sorted(
        f"{name} ({choice.impl})" for name, choice in kernel_choices.items()
        if not choice.graph_safe and name not in attn_backend.ops)
    if blockers:
        logger.warning("CUDA/HIP graphs disabled: %s cannot be captured (they sync with the host)",
                       ", ".join(blockers))
        return None
    return CUDAGraphRunner(compilation_config.cudagraph_capture_sizes, hidden_size, dtype, device,
                           platform.create_graph, platform.graph_pool_handle(), verify_query_len, verify_max_reqs,
                           max_num_tokens)
