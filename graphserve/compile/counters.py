"""Process-wide counters of compiles and graph captures, so tests can assert "one graph, no recompiles".

Like vLLM's `compilation_counter`: the compile backend and the graph runner bump these; a test takes a
snapshot before serving and compares afterwards. torch._dynamo's own counters (unique graphs, graph breaks)
are read alongside as a cross-check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class CompilationCounter:
    """How many times each compile/capture event happened in this process."""

    num_models_compiled: int = 0  # forwards wrapped with torch.compile
    num_graphs_compiled: int = 0  # FX graphs handed to inductor: one per forward, plus one per recompile
    num_cudagraphs_captured: int = 0  # CUDA/HIP graphs captured (one per decode bucket and per verify bucket)
    num_cudagraph_replays: int = 0  # decode and verify steps served by a graph replay
    num_verify_graph_replays: int = 0  # of those, verify steps (several query rows per request)

    def snapshot(self) -> CompilationCounter:
        """A frozen copy of the current counts."""
        return dataclasses.replace(self)

    def since(self, before: CompilationCounter) -> dict[str, int]:
        """Per counter, how much it grew since `before`."""
        return {f.name: getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)}


compilation_counter = CompilationCounter()


def dynamo_counts() -> dict[str, int]:
    """torch._dynamo's view: distinct graphs traced and graph breaks taken in this process."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
