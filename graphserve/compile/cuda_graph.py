"""CUDA/HIP graphs for decode steps: one graph per batch bucket, captured at start-up, replayed per step.

A decode step (every request schedules exactly one token) of n requests is padded to the smallest bucket
>= n and served by replaying that bucket's graph. The runner only captures and replays: what a graph reads
lives elsewhere, at fixed addresses, and is rewritten before each replay —
- the model inputs (`input_ids`, `positions`) in the model runner's persistent buffers;
- the attention metadata in the attention backend's buffers (`build_for_capture` / `prepare_for_replay`).
The graphs' output (the hidden states) is the runner's own static buffer.

Graphs are captured largest first and share one memory pool, so smaller buckets reuse the largest one's
intermediate buffers. Mixed prefill/decode steps never use graphs.
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

# Builds the forward of one bucket: called once per capture size, returns a function that runs the model on
# the static inputs of that many rows and returns their hidden states.
StepBuilder = Callable[[int], Callable[[], torch.Tensor]]


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
    """One graph per decode bucket over static inputs, and the static buffer their hidden states land in."""

    def __init__(
        self,
        capture_sizes: Sequence[int],
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        create_graph: Callable[[object], DeviceGraph],
        pool: object = None,
    ) -> None:
        self.buckets = GraphBuckets(capture_sizes)
        self.create_graph = create_graph
        self.pool = pool
        with torch.inference_mode():
            self.hidden_states = torch.zeros(self.buckets.max_size, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, DeviceGraph] = {}
        self.capture_seconds = 0.0

    @property
    def num_graphs(self) -> int:
        """How many buckets have a captured graph."""
        return len(self.graphs)

    @torch.inference_mode()
    def capture(self, build_step: StepBuilder) -> None:
        """Capture every bucket, largest first, into one shared pool (after a warm-up run of each)."""
        start = time.perf_counter()
        for size in reversed(self.buckets.sizes):
            step = build_step(size)
            out = self.hidden_states[:size]

            def run(step: Callable[[], torch.Tensor] = step, out: torch.Tensor = out) -> None:
                out.copy_(step())

            # The warm-up compiles/JITs kernels and lets libraries allocate workspaces outside the capture.
            run()
            graph = self.create_graph(self.pool)
            graph.capture(run)
            self.graphs[size] = graph
            compilation_counter.num_cudagraphs_captured += 1
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode graphs (batch sizes %d..%d) in %.1f s", len(self.graphs),
                    self.buckets.sizes[0], self.buckets.max_size, self.capture_seconds)

    def padded_size(self, num_reqs: int, num_tokens: int) -> int | None:
        """The bucket of a decode-only step (one token per request) that fits; None for any other step."""
        if not self.graphs or num_tokens != num_reqs:
            return None
        return self.buckets.padded_size(num_reqs)

    def replay(self, size: int) -> torch.Tensor:  # [size, hidden_size], valid until the next replay
        """Replay bucket `size` (its inputs already written); returns its rows of the static output."""
        self.graphs[size].replay()
        compilation_counter.num_cudagraph_replays += 1
        return self.hidden_states[:size]


def create_graph_runner(
    compilation_config: CompilationConfig,
    platform: Platform,
    kernel_choices: dict[str, KernelChoice],
    attn_backend: type[AttentionBackend],
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> CUDAGraphRunner | None:
    """A graph runner when graphs are asked for and everything a decode step runs can be captured, else None."""
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
                           platform.create_graph, platform.graph_pool_handle())
