"""torch.compile of the model forward: one inductor graph over the flat token dimension, custom ops opaque."""
from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from graphserve.compile.counters import compilation_counter
from graphserve.config import CompilationConfig, CompilationLevel

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CompiledForward:
    """`forward(input_ids, positions)` under torch.compile(fullgraph=True) with a counting inductor backend.

    Only the token dimension varies between steps. It is marked *unbacked* rather than merely dynamic: a
    backed symbolic size is specialized when it is 0 or 1, so the first one-token step (a lone decode) would
    recompile. Unbacked, the single graph serves every token count, from 1 to max_num_batched_tokens.
    Everything else (weights, KV caches, per-step metadata) is either a constant of the graph or read by the
    opaque `torch.ops.graphserve.*` ops at run time, so serving causes no guard to fail.
    """

    def __init__(self, forward: ForwardFn, inductor_options: dict[str, Any] | None = None) -> None:
        self.inductor_options = dict(inductor_options or {})
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self._compiled = torch.compile(_private_code(forward), fullgraph=True, backend=self._backend)
        compilation_counter.num_models_compiled += 1

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """Inductor, with this model's config patches passed to this compile only (never set globally)."""
        from torch._inductor.compile_fx import compile_fx

        if self.num_compiles > 0:
            logger.warning("compiling the forward again (a guard failed): graph #%d", self.num_compiles + 1)
        start = time.perf_counter()
        try:
            compiled = compile_fx(gm, example_inputs, config_patches=self.inductor_options)
        except Exception as e:
            # Dynamo may restart its analysis from inside the backend (then it calls us again): not a new graph.
            logger.info("inductor stopped compiling the forward: %s: %s", type(e).__name__, str(e)[:200])
            raise
        self.num_compiles += 1
        compilation_counter.num_graphs_compiled += 1
        self.compile_seconds += time.perf_counter() - start
        logger.info("inductor compiled the forward (%d FX nodes) in %.1f s", len(gm.graph.nodes),
                    time.perf_counter() - start)
        return compiled

    def __call__(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """Run the compiled forward (compiling it on the first call)."""
        # The marks only matter when dynamo traces (first call, or a recompile), but are cheap attribute sets.
        torch._dynamo.decorators.mark_unbacked(input_ids, 0)
        torch._dynamo.decorators.mark_unbacked(positions, 0)
        return self._compiled(input_ids, positions)


def _private_code(forward: ForwardFn) -> ForwardFn:
    """`forward` (a bound method) re-bound over a private copy of its function's code object.

    Dynamo keeps compiled graphs, and counts recompiles, per code object. Every model of a class shares
    `forward.__code__`, so each further engine in a process (a test suite, a notebook, a draft model beside its
    target) would count as a recompile of the first one's forward, and the eighth would hit dynamo's
    recompile_limit even after the others were freed. A copy per model gives each model its own cache, freed
    with it.
    """
    func = getattr(forward, "__func__", None)
    if func is None:  # a plain function: nothing shared with other models
        return forward
    clone = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                               func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    clone.__qualname__ = func.__qualname__
    clone.__dict__.update(func.__dict__)
    return types.MethodType(clone, forward.__self__)


def create_forward_fn(model: torch.nn.Module, compilation_config: CompilationConfig) -> ForwardFn:
    """The callable the runner uses for the forward: `model.forward` itself, or its compiled wrapper."""
    if compilation_config.level == CompilationLevel.NO_COMPILATION:
        return model.forward
    if compilation_config.cache_dir:
        from graphserve import envs

        envs.export_inductor_cache_dir(compilation_config.cache_dir)
    return CompiledForward(model.forward, compilation_config.inductor_compile_config)
