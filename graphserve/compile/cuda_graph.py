"""CUDA/HIP graphs for decode steps: one graph per batch bucket, captured at start-up, replayed per step.

A decode step (every request schedules exactly one token) of n requests is padded to the smallest bucket
>= n and served by replaying that bucket's graph. The graph reads its inputs from static buffers owned by
the runner, which are updated in place before each replay:

- `input_ids`, `positions`, `slot_mapping` [max_bs]; `seq_lens` [max_bs]; `block_table` [max_bs, max_blocks];
  `query_start_loc` [max_bs + 1] (always 0..bucket: one query token per row).
- Padded rows write nowhere (slot_mapping = -1) and read only in bounds: seq_len 1 over block 0, which
  always exists, so an attention kernel launched over the whole bucket never touches memory past the pool.
- Attention metadata is static too: max_query_len = 1 and max_seq_len = max_model_len (an upper bound, so
  the kernels' grids do not depend on the batch).

Graphs are captured largest first and share one memory pool, so smaller buckets reuse the largest one's
intermediate buffers. Mixed prefill/decode steps never use graphs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from graphserve.attention.backends.base import PAD_SLOT_ID, AttentionMetadata
from graphserve.attention.forward_context import set_forward_context
from graphserve.compile.counters import compilation_counter
from graphserve.config import CompilationConfig

if TYPE_CHECKING:
    from graphserve.platforms.interface import Platform
    from graphserve.platforms.kernels import KernelChoice

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


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


class Graph(Protocol):
    """What the runner needs from a captured graph."""

    def capture(self, fn: Callable[[], None]) -> None:
        """Record `fn` (its kernels and the buffers they touch)."""

    def replay(self) -> None:
        """Re-launch the recorded work."""


class DeviceGraph:
    """A torch.cuda.CUDAGraph (CUDA or HIP) captured into a memory pool shared by every bucket."""

    def __init__(self, pool: object) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None]) -> None:
        """Capture `fn` on torch's side capture stream."""
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self) -> None:
        """Launch the whole graph with one call."""
        self.graph.replay()


class RerunGraph:
    """The Graph interface without a GPU: replay re-runs the captured function over the same static buffers.

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


class _StaticInputs:
    """The buffers a graph reads (on the device) and two sets of host-side staging copies (pinned on CUDA).

    Steps alternate between the staging sets: with async scheduling, step N+1 is staged while step N's upload
    may still be queued, but step N-1 (the other set's last reader) has finished by then.

    The device buffers are inference tensors, like the inputs of every other step (created under the
    runner's inference mode): torch.compile guards on the dispatch keys, and a normal tensor would recompile.
    """

    @torch.inference_mode()
    def __init__(self, max_bs: int, max_blocks_per_seq: int, device: torch.device, pin_memory: bool) -> None:
        shapes = {
            "input_ids": ((max_bs,), torch.int64, 0),
            "positions": ((max_bs,), torch.int64, 0),
            "slot_mapping": ((max_bs,), torch.int64, PAD_SLOT_ID),
            "seq_lens": ((max_bs,), torch.int32, 1),
            "block_table": ((max_bs, max_blocks_per_seq), torch.int32, 0),
        }
        self.device = {n: torch.full(s, f, dtype=d, device=device) for n, (s, d, f) in shapes.items()}
        self._host_sets = [{n: torch.full(s, f, dtype=d, pin_memory=pin_memory) for n, (s, d, f) in shapes.items()}
                           for _ in range(2)]
        self._host_np_sets = [{n: t.numpy() for n, t in host.items()} for host in self._host_sets]
        self._turn = 0
        # Every row holds exactly one query token, padded rows included: fixed for the runner's lifetime.
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)

    @property
    def host(self) -> dict[str, torch.Tensor]:
        """The staging set of this step (pinned on CUDA)."""
        return self._host_sets[self._turn]

    @property
    def host_np(self) -> dict[str, np.ndarray]:
        """Numpy views of `host`."""
        return self._host_np_sets[self._turn]

    def next_staging_set(self) -> None:
        """Switch `host` / `host_np` to the other staging set (once per step, before staging)."""
        self._turn ^= 1

    @torch.inference_mode()
    def upload(self, size: int) -> None:
        """Copy rows [0, size) of every staging buffer to the device (asynchronously from pinned memory)."""
        for name, host in self.host.items():
            self.device[name][:size].copy_(host[:size], non_blocking=True)


class CUDAGraphRunner:
    """Owns the static decode buffers and one graph per bucket; replays the bucket that fits a decode step."""

    def __init__(
        self,
        forward_fn: ForwardFn,
        capture_sizes: Sequence[int],
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        graph_cls: Callable[[object], Graph] | None = None,
    ) -> None:
        self.forward_fn = forward_fn
        self.buckets = GraphBuckets(capture_sizes)
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = device
        self.graph_cls = graph_cls if graph_cls is not None else DeviceGraph
        max_bs = self.buckets.max_size
        self.inputs = _StaticInputs(max_bs, self.max_blocks_per_seq, device, pin_memory=device.type == "cuda")
        with torch.inference_mode():
            self.hidden_states = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, Graph] = {}
        self.capture_seconds = 0.0

    @property
    def num_graphs(self) -> int:
        """How many buckets have a captured graph."""
        return len(self.graphs)

    def metadata(self, size: int) -> AttentionMetadata:
        """Attention metadata of bucket `size`: views of the static buffers plus the static bounds."""
        buf = self.inputs.device
        return AttentionMetadata(
            slot_mapping=buf["slot_mapping"][:size],
            query_start_loc=self.inputs.query_start_loc[: size + 1],
            seq_lens=buf["seq_lens"][:size],
            block_table=buf["block_table"][:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            num_actual_tokens=size,
        )

    @torch.inference_mode()
    def capture(self, kv_caches: KVCaches) -> None:
        """Capture every bucket, largest first, into one shared pool (after a warm-up run of each)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.stage_padding(0, self.buckets.max_size)
        self.inputs.upload(self.buckets.max_size)
        for size in reversed(self.buckets.sizes):
            run = self._make_run(size, kv_caches)
            # The warm-up compiles/JITs kernels and lets libraries allocate workspaces outside the capture.
            run()
            graph = self.graph_cls(pool)
            graph.capture(run)
            self.graphs[size] = graph
            compilation_counter.num_cudagraphs_captured += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode graphs (batch sizes %d..%d) in %.1f s", len(self.graphs),
                    self.buckets.sizes[0], self.buckets.max_size, self.capture_seconds)

    def _make_run(self, size: int, kv_caches: KVCaches) -> Callable[[], None]:
        attn_metadata = self.metadata(size)
        input_ids = self.inputs.device["input_ids"][:size]
        positions = self.inputs.device["positions"][:size]
        out = self.hidden_states[:size]

        def run() -> None:
            with set_forward_context(attn_metadata, kv_caches):
                out.copy_(self.forward_fn(input_ids, positions))

        return run

    def can_run(self, num_reqs: int, num_tokens: int) -> bool:
        """True for a decode-only step (one token per request) that fits a captured bucket."""
        return bool(self.graphs) and num_tokens == num_reqs and 1 <= num_reqs <= self.buckets.max_size

    def stage(
        self,
        input_ids: np.ndarray,  # [num_reqs] int64
        positions: np.ndarray,  # [num_reqs] int64
        slot_mapping: np.ndarray,  # [num_reqs] int64
        seq_lens: np.ndarray,  # [num_reqs] int32
        block_table: np.ndarray,  # [num_reqs, width] int32, width <= max_blocks_per_seq
    ) -> int:
        """Write a decode batch into the staging buffers, padded to its bucket; returns the bucket size."""
        n = input_ids.shape[0]
        size = self.buckets.padded_size(n)
        if size is None:
            raise ValueError(f"a decode batch of {n} requests has no graph bucket (max {self.buckets.max_size})")
        self.inputs.next_staging_set()
        h = self.inputs.host_np
        h["input_ids"][:n] = input_ids
        h["positions"][:n] = positions
        h["slot_mapping"][:n] = slot_mapping
        h["seq_lens"][:n] = seq_lens
        width = block_table.shape[1]
        h["block_table"][:n, :width] = block_table
        # Columns past this step's width may hold blocks of earlier requests: clear them so no row can reach them.
        h["block_table"][:n, width:] = 0
        self.stage_padding(n, size)
        return size

    def stage_padding(self, start: int, end: int) -> None:
        """Rows [start, end) become padding: token 0 at position 0, no cache write, one token of context in block 0."""
        h = self.inputs.host_np
        h["input_ids"][start:end] = 0
        h["positions"][start:end] = 0
        h["slot_mapping"][start:end] = PAD_SLOT_ID
        h["seq_lens"][start:end] = 1
        h["block_table"][start:end] = 0

    @torch.inference_mode()
    def run(
        self,
        input_ids: np.ndarray,  # [num_reqs] int64
        positions: np.ndarray,  # [num_reqs] int64
        slot_mapping: np.ndarray,  # [num_reqs] int64
        seq_lens: np.ndarray,  # [num_reqs] int32
        block_table: np.ndarray,  # [num_reqs, width] int32
        device_input_ids: tuple[torch.Tensor, torch.Tensor] | None = None,  # (token indices, ids) on the device
    ) -> torch.Tensor:  # [num_reqs, hidden_size], valid until the next replay
        """Stage the batch, upload it, replay its bucket's graph; returns the hidden states of the real rows.

        `device_input_ids` overwrite some input ids after the upload: tokens the previous step sampled, which
        have not reached the host (async scheduling).
        """
        n = input_ids.shape[0]
        size = self.stage(input_ids, positions, slot_mapping, seq_lens, block_table)
        self.inputs.upload(size)
        if device_input_ids is not None:
            self.inputs.device["input_ids"].index_copy_(0, *device_input_ids)
        self.graphs[size].replay()
        compilation_counter.num_cudagraph_replays += 1
        return self.hidden_states[:n]


def create_graph_runner(
    compilation_config: CompilationConfig,
    platform: "Platform",
    kernel_choices: dict[str, "KernelChoice"],
    forward_fn: ForwardFn,
    *,
    max_model_len: int,
    block_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> CUDAGraphRunner | None:
    """A graph runner when graphs are asked for and every op of the forward can be captured, else None."""
    if not compilation_config.use_cudagraph:
        return None
    if not platform.capabilities.supports_graphs:
        logger.info("the %s platform has no graph capture: decode steps run without graphs", platform.name.value)
        return None
    blockers = sorted(name for name, choice in kernel_choices.items() if not choice.graph_safe)
    if blockers:
        logger.warning("CUDA/HIP graphs disabled: %s run the torch reference, which syncs with the host",
                       ", ".join(blockers))
        return None
    return CUDAGraphRunner(forward_fn, compilation_config.cudagraph_capture_sizes, max_model_len, block_size,
                           hidden_size, dtype, device)
