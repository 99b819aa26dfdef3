"""Host overhead per engine step: N running decode requests, a stub model (no device work to speak of).

Measures everything the CPU does around the model each step: schedule, input preparation, attention metadata,
sampling-metadata build, the sampler on tiny logits, scheduler update, detokenization and output building.
Target (performance.md): <= 1 ms per step at 256 running requests.

    python -m perf.bench_host_overhead --num-requests 256 --out perf/results/cpu/host_overhead.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from perf.common import write_record
from perf.tiny_checkpoint import write_tiny_checkpoint


class StubModel(nn.Module):
    """Stands in for the network: zero hidden states and fixed logits (a different favourite per position)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.logits = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.hidden_size)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(hidden_states.shape[0], -1).clone()


def build_engine(path: str, num_requests: int, max_tokens: int):
    from graphserve.engine.arg_utils import EngineArgs
    from graphserve.engine.llm_engine import LLMEngine

    write_tiny_checkpoint(path, "llama", weights=False, max_position_embeddings=2048)
    args = EngineArgs(model=path, load_format="dummy", dtype="float32", max_num_seqs=num_requests,
                      max_num_batched_tokens=max(2048, num_requests), kv_cache_memory="1GiB")
    engine = LLMEngine.from_engine_args(args)
    runner = engine.engine_core.model_executor.model_runner
    runner.model = StubModel(engine.model_config.hidden_size, engine.model_config.vocab_size)
    runner.forward_fn = runner.model  # the runner calls forward_fn (the model's forward, or its compiled wrapper)
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-kind", default="final_only", choices=["final_only", "delta", "cumulative"],
                        help="final_only is what LLM.generate uses; delta is what streaming serving uses")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from graphserve.sampling_params import RequestOutputKind, SamplingParams

    with tempfile.TemporaryDirectory() as path:
        engine = build_engine(path, args.num_requests, args.steps + 50)
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 50, ignore_eos=True,
                                output_kind=RequestOutputKind[args.output_kind.upper()])
        for i in range(args.num_requests):
            engine.add_request(str(i), {"prompt_token_ids": [5 + (i + j) % 400 for j in range(args.prompt_len)]},
                               params)
        while engine.engine_core.scheduler.num_waiting:  # prefill everything first
            engine.step()
        for _ in range(10):
            engine.step()
        core, times, parts = engine.engine_core, [], {"schedule": [], "execute": [], "update": [], "output": []}
        for _ in range(args.steps):
            t0 = time.perf_counter_ns()
            so = core.scheduler.schedule()
            t1 = time.perf_counter_ns()
            mo = core.model_executor.execute_model(so).get_output()
            t2 = time.perf_counter_ns()
            outs = core.scheduler.update_from_output(so, mo)
            t3 = time.perf_counter_ns()
            engine.output_processor.process_outputs(outs)
            t4 = time.perf_counter_ns()
            assert len(so.num_scheduled_tokens) == args.num_requests
            times.append((t4 - t0) / 1e6)
            for key, a, b in (("schedule", t0, t1), ("execute", t1, t2), ("update", t2, t3), ("output", t3, t4)):
                parts[key].append((b - a) / 1e6)
    results = {
        "num_running_requests": args.num_requests,
        "output_kind": args.output_kind,
        "steps": args.steps,
        "step_ms_median": round(statistics.median(times), 4),
        "step_ms_p90": round(sorted(times)[int(0.9 * len(times))], 4),
        "breakdown_ms_median": {k: round(statistics.median(v), 4) for k, v in parts.items()},
        "target_ms": 1.0,
    }
    write_record("host_overhead", results, args.out)


if __name__ == "__main__":
    main()
