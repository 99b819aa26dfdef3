"""The CPU hot paths the regression gate times, each built once and returned as a zero-argument callable.

Every builder does its (untimed) setup and returns a `HotPath`: `run()` is one round of work, sized to a few
milliseconds so the timer's resolution never matters. Only public entry points of the engine are driven
(`Scheduler.schedule/update_from_output`, `InputBatch.prepare`, `build_sampling_metadata`, `Sampler`,
`IncrementalDetokenizer`, `LLMEngine.step`), so when their internals change the figures move but this file does
not; when their signatures change, the one builder that calls them is the place to adapt.

`calibration_round` is the fixed reference workload every hot path is divided by (see perf_gate.py): the same
mix of pure-Python bookkeeping, list-to-numpy conversion and small torch ops that the hot paths spend their time
in, with no graphserve code, so it only moves when the machine does.
"""
from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

NUM_DECODE_REQUESTS = 256  # the host-overhead target of performance.md is set at 256 running requests
BLOCK_SIZE = 16


@dataclass
class HotPath:
    """One benchmarked path: `run()` is one timed round; `rounds` / `warmup_rounds` are what pytest-benchmark runs."""

    name: str
    run: Callable[[], object]
    rounds: int
    warmup_rounds: int
    # Keeps objects the callable needs alive (temporary directories, engines) for as long as the HotPath lives.
    keep_alive: list = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------- calibration
class _Slot:
    __slots__ = ("key", "count", "tokens")

    def __init__(self, key: str, count: int) -> None:
        self.key = key
        self.count = count
        self.tokens: list[int] = []


_CAL_GEN = torch.Generator().manual_seed(0)
_CAL_LOGITS = torch.randn(64, 1024, generator=_CAL_GEN)  # [64, 1024] float32
_CAL_HIDDEN = torch.randn(8, 64, generator=_CAL_GEN)  # [8, 64] float32
_CAL_QKV = torch.randn(192, 64, generator=_CAL_GEN) * 0.1  # [3 * 64, 64] float32
_CAL_UP = torch.randn(256, 64, generator=_CAL_GEN) * 0.1  # [2 * 128, 64] float32
_CAL_DOWN = torch.randn(64, 128, generator=_CAL_GEN) * 0.1  # [64, 128] float32
_CAL_COS = torch.randn(8, 8, generator=_CAL_GEN)  # [8, head_dim / 2] float32
_CAL_WORDS = [f"w{i}\u00e9" for i in range(64)]


def _calibration_layer(x: torch.Tensor) -> torch.Tensor:
    """A small decoder layer from functional torch ops (the many-small-ops mix of an eager forward)."""
    h = torch.nn.functional.rms_norm(x, (64,))
    q, k, v = torch.nn.functional.linear(h, _CAL_QKV).view(8, 3, 4, 16).unbind(1)  # [8, 4, 16] each
    q1, q2 = q.chunk(2, dim=-1)
    q = torch.cat([q1 * _CAL_COS[:, None] - q2, q2 * _CAL_COS[:, None] + q1], dim=-1)
    attn = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            is_causal=True)
    x = x + attn.transpose(0, 1).reshape(8, 64)
    gate, up = torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (64,)), _CAL_UP).chunk(2, dim=-1)
    return x + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, _CAL_DOWN)


def calibration_python() -> int:
    """The interpreter half of the calibration: object/dict bookkeeping, lists → numpy, string building."""
    # Scheduler-like: attribute reads and writes on 256 objects held in a dict, list appends, integer maths.
    slots = {f"r{i}": _Slot(f"r{i}", i) for i in range(256)}
    total = 0
    for _ in range(6):
        for key, slot in slots.items():
            slot.count += 1
            slot.tokens.append(slot.count % 97)
            if slot.count % 16 == 0:
                total += len(slot.tokens) + len(key)
    # Input-preparation-like: per-item Python lists turned into numpy arrays once.
    ids = [s.tokens[-1] for s in slots.values()]
    positions = [s.count for s in slots.values()]
    arr = np.asarray(ids, dtype=np.int64) * 16 + np.asarray(positions, dtype=np.int64) % 16
    total += int(np.diff(np.cumsum(arr)).sum())
    # Detokenizer-like: string building, slicing, UTF-8 round trips.
    text = ""
    for i in range(256):
        text += _CAL_WORDS[i % 64]
        total += len(text[-8:].encode().decode())
    return total


def calibration_torch(num_layers: int = 4) -> int:
    """The torch half of the calibration: eager decoder layers over 8 tokens, then sampler-like ops."""
    hidden = _CAL_HIDDEN
    for _ in range(num_layers):
        hidden = _calibration_layer(hidden)
    probs = _CAL_LOGITS.softmax(dim=-1)
    sorted_probs, _ = probs.sort(dim=-1)
    total = int(sorted_probs.cumsum(dim=-1).argmax(dim=-1).sum())
    q = torch.empty_like(probs).exponential_(generator=torch.Generator().manual_seed(total))
    return total + sum(probs.div_(q).argmax(dim=-1).tolist()) + int(hidden.argmax())


def calibration_round() -> int:
    """A fixed CPU workload shaped like the hot paths: calibration_python() then calibration_torch()."""
    return calibration_python() + calibration_torch()


# ---------------------------------------------------------------------------------------------- scheduler
def scheduler_step(num_requests: int = NUM_DECODE_REQUESTS, steps_per_round: int = BLOCK_SIZE) -> HotPath:
    """`Scheduler.schedule()` + `update_from_output()` with `num_requests` running decode requests.

    A round of BLOCK_SIZE steps crosses exactly one block boundary per request, so every round costs the same.
    """
    from graphserve.config import CacheConfig, SchedulerConfig
    from graphserve.core.request import Request
    from graphserve.core.scheduler import Scheduler
    from graphserve.core.scheduler_output import ModelRunnerOutput
    from graphserve.sampling_params import SamplingParams

    rounds, warmup = 50, 5
    prompt_len = 32
    max_tokens = (rounds + warmup + 2) * steps_per_round + 8  # nobody finishes while being timed
    max_model_len = prompt_len + max_tokens + 1
    scheduler = Scheduler(
        SchedulerConfig(max_model_len=max_model_len, max_num_seqs=num_requests,
                        max_num_batched_tokens=num_requests * prompt_len),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_requests * -(-max_model_len // BLOCK_SIZE)),
    )
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    rng = random.Random(0)
    for i in range(num_requests):
        scheduler.add_request(Request(f"req-{i}", [rng.randrange(2, 500) for _ in range(prompt_len)], params,
                                      eos_token_ids=(1,)))

    def step() -> None:
        so = scheduler.schedule()
        req_ids = list(so.num_scheduled_tokens)
        if len(req_ids) != num_requests:
            raise RuntimeError(f"{len(req_ids)} requests scheduled instead of {num_requests}: raise max_tokens")
        scheduler.update_from_output(so, ModelRunnerOutput(req_ids, [[11] for _ in req_ids]))

    step()  # the whole prompts fit in one step's budget: every request decodes from here on

    def run() -> None:
        for _ in range(steps_per_round):
            step()

    return HotPath("scheduler", run, rounds=rounds, warmup_rounds=warmup)


# ---------------------------------------------------------------------------------------------- model runner
def _mixed_params(i: int):
    """Mixed sampling settings: greedy, temperature + top-p, top-k, a penalty, a seeded request."""
    from graphserve.sampling_params import SamplingParams

    kind = i % 8
    if kind < 4:
        return SamplingParams(temperature=0.0, max_tokens=64)
    if kind < 6:
        return SamplingParams(temperature=0.8, top_p=0.9, max_tokens=64)
    if kind == 6:
        return SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.1, max_tokens=64)
    return SamplingParams(temperature=0.7, top_p=0.95, seed=i, max_tokens=64)


def _decode_states(num_requests: int, prompt_len: int = 100, output_len: int = 20):
    """Runner-side states of `num_requests` decoding requests, each holding its blocks."""
    from graphserve.worker.input_batch import CachedRequestState

    rng = random.Random(1)
    states = []
    num_blocks = -(-(prompt_len + output_len + 1) // BLOCK_SIZE)
    for i in range(num_requests):
        prompt = [rng.randrange(2, 500) for _ in range(prompt_len)]
        output = [rng.randrange(2, 500) for _ in range(output_len)]
        states.append(CachedRequestState(
            req_id=f"req-{i}", prompt_token_ids=prompt, output_token_ids=output, sampling_params=_mixed_params(i),
            block_ids=list(range(i * num_blocks, (i + 1) * num_blocks)),
            # One token left to compute: the last sampled one.
            num_computed_tokens=prompt_len + output_len - 1,
        ))
    return states


def input_prepare(num_requests: int = NUM_DECODE_REQUESTS, calls_per_round: int = 20) -> HotPath:
    """`InputBatch.prepare` for `num_requests` decode requests (one token each)."""
    from graphserve.worker.input_batch import InputBatch

    states = _decode_states(num_requests)
    num_scheduled = [1] * num_requests
    input_batch = InputBatch(BLOCK_SIZE)
    if len(input_batch.prepare(states, num_scheduled).sampling_req_indices) != num_requests:
        raise RuntimeError("every decode request should sample")

    def run() -> None:
        for _ in range(calls_per_round):
            input_batch.prepare(states, num_scheduled)

    return HotPath("input_prepare", run, rounds=80, warmup_rounds=5)


def sampling_metadata(num_requests: int = NUM_DECODE_REQUESTS, vocab_size: int = 32000,
                      calls_per_round: int = 4) -> HotPath:
    """`build_sampling_metadata` for `num_requests` decode requests with mixed sampling settings."""
    from graphserve.sample.metadata import build_sampling_metadata

    reqs = [st.sampling for st in _decode_states(num_requests)]
    generator = torch.Generator().manual_seed(0)
    if build_sampling_metadata(reqs, vocab_size, "cpu", generator).all_greedy:
        raise RuntimeError("the batch should mix greedy and random rows")

    def run() -> None:
        for _ in range(calls_per_round):
            build_sampling_metadata(reqs, vocab_size, "cpu", generator)

    return HotPath("sampling_metadata", run, rounds=80, warmup_rounds=5)


def sampler(num_rows: int = 64, vocab_size: int = 1024) -> HotPath:
    """`Sampler` on [num_rows, vocab_size] float32 logits with mixed greedy / top-p / top-k rows."""
    from graphserve.sample.metadata import build_sampling_metadata
    from graphserve.sample.sampler import Sampler

    reqs = [st.sampling for st in _decode_states(num_rows)]
    metadata = build_sampling_metadata(reqs, vocab_size, "cpu", torch.Generator().manual_seed(0))
    logits = torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(2))  # [B, V] float32
    module = Sampler()

    def run() -> None:
        module(logits, metadata)

    return HotPath("sampler", run, rounds=80, warmup_rounds=5)


# ---------------------------------------------------------------------------------------------- detokenizer
# Words the tiny tokenizer knows and multi-byte characters it splits across tokens (held back until complete).
_DETOKENIZER_TEXT = (
    "The capital of France is Paris. Continuous batching shares every engine step between many requests. "
    "Café, naïve, jalapeño, 中文字符, emoji 🙂 and other multi-byte text. def add(a, b):\n    return a + b\n"
)


def detokenizer(num_sequences: int = 64, num_tokens: int = 24) -> HotPath:
    """`IncrementalDetokenizer.update` one token at a time for `num_sequences` sequences (a decode step each)."""
    from graphserve.engine.detokenizer import IncrementalDetokenizer
    from perf.tiny_checkpoint import build_tokenizer

    tokenizer = build_tokenizer()
    text_ids = tokenizer.encode(_DETOKENIZER_TEXT * 3, add_special_tokens=False)
    if len(text_ids) < 40 + num_tokens:  # every output below must have num_tokens tokens
        raise ValueError(f"the text has {len(text_ids)} tokens, fewer than the sequences need")
    sequences = [
        (text_ids[i % 7: i % 7 + 8], text_ids[(3 * i) % 40: (3 * i) % 40 + num_tokens]) for i in range(num_sequences)
    ]

    def run() -> None:
        detoks = [IncrementalDetokenizer(tokenizer, prompt) for prompt, _ in sequences]
        for step in range(num_tokens):
            for detok, (_, output) in zip(detoks, sequences):
                detok.update(output[step: step + 1])

    return HotPath("detokenizer", run, rounds=80, warmup_rounds=5)


# ---------------------------------------------------------------------------------------------- engine
def engine_step(checkpoint_dir: str | None = None, num_requests: int = 8, steps_per_round: int = 2,
                rounds: int = 50, warmup_rounds: int = 5) -> HotPath:
    """`LLMEngine.step()` of a tiny random Llama (fp32, eager) decoding `num_requests` requests.

    Every timed step is a pure decode step of all of them: the prompts are prefilled first and nobody finishes,
    so rounds * steps_per_round must fit in the tiny model's context (256 positions).
    """
    from graphserve.engine.arg_utils import EngineArgs
    from graphserve.engine.llm_engine import LLMEngine
    from graphserve.sampling_params import RequestOutputKind, SamplingParams

    keep_alive = []
    if checkpoint_dir is None:
        from perf.tiny_checkpoint import write_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory()
        keep_alive.append(tmp)
        checkpoint_dir = tmp.name
        write_tiny_checkpoint(checkpoint_dir, "llama")
    prompt_len = 16
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=checkpoint_dir, dtype="float32", max_num_seqs=num_requests, kv_cache_memory="64MiB", seed=0,
    ))
    keep_alive.append(engine)
    max_tokens = (rounds + warmup_rounds + 2) * steps_per_round + 4
    if prompt_len + max_tokens > engine.model_config.max_model_len:
        raise ValueError(f"{rounds + warmup_rounds} rounds of {steps_per_round} steps do not fit in the context")
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(num_requests):
        engine.add_request(f"req-{i}", {"prompt_token_ids": [5 + (i * 7 + j) % 400 for j in range(prompt_len)]},
                           params)
    engine.step()  # the prefill of every prompt: decode steps only from here on

    def run() -> None:
        for _ in range(steps_per_round):
            if engine.step():
                raise RuntimeError("a request finished while being timed: raise max_tokens")

    return HotPath("engine_step", run, rounds=rounds, warmup_rounds=warmup_rounds, keep_alive=keep_alive)


# Name → builder, in the order the suite runs them.
HOT_PATHS: dict[str, Callable[..., HotPath]] = {
    "scheduler": scheduler_step,
    "input_prepare": input_prepare,
    "sampling_metadata": sampling_metadata,
    "sampler": sampler,
    "detokenizer": detokenizer,
    "engine_step": engine_step,
}
