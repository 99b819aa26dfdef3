"""AsyncLLM without HTTP: concurrent streams equal the offline engine, aborts free KV at once, failures propagate."""
import asyncio
import time

import pytest

from graphserve import LLM, SamplingParams
from graphserve.engine.arg_utils import EngineArgs
from graphserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestAbortedError, merge_delta
from graphserve.outputs import CompletionOutput, Logprob, RequestOutput
from graphserve.sampling_params import RequestOutputKind

PROMPTS = ["The capital of France is", "Continuous batching shares", "A paged KV cache", "def add(a, b):"]
NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")[0]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async_scheduling"])
def engine(model_dir, request):
    """Every test runs against both engine loops: synchronous steps, and async scheduling (a step in flight)."""
    args = EngineArgs(model=model_dir, num_gpu_blocks_override=NUM_BLOCKS, async_scheduling=request.param)
    engine = AsyncLLM.from_engine_args(args, log_requests=False)
    yield engine
    engine.shutdown()


def _params(kind=RequestOutputKind.DELTA, **kwargs):
    return SamplingParams(output_kind=kind, **kwargs)


async def _collect(stream, first=None):
    """Concatenate a DELTA stream (after `first`, an output already taken): {index: text}, token ids, reasons."""
    texts, token_ids, reasons = {}, {}, {}

    async def outputs():
        if first is not None:
            yield first
        async for output in stream:
            yield output

    async for output in outputs():
        for c in output.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text
            token_ids[c.index] = token_ids.get(c.index, []) + c.token_ids
            reasons[c.index] = c.finish_reason
    return texts, token_ids, reasons


def _wait_idle(engine, timeout=10.0):
    scheduler = engine.engine_core.core.scheduler
    deadline = time.monotonic() + timeout
    while scheduler.has_unfinished_requests():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return scheduler


def test_concurrent_streams_equal_offline_running_at_the_same_time(engine, model_dir):
    llm = LLM(model_dir, num_gpu_blocks_override=NUM_BLOCKS)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, n=2, seed=11, max_tokens=32, ignore_eos=True)

    async def main():
        streams = [engine.add_request(f"g{i}", p, _params(temperature=0.0, max_tokens=32, ignore_eos=True))
                   for i, p in enumerate(PROMPTS)]
        streams.append(engine.add_request("s", PROMPTS[0], _params(temperature=1.0, n=2, seed=11, max_tokens=32,
                                                                   ignore_eos=True)))
        firsts = [await s.__anext__() for s in streams]
        # The async engine's thread is stepping now; the offline engine runs on a worker thread meanwhile.
        offline = asyncio.to_thread(llm.generate, PROMPTS + PROMPTS[:1], [greedy] * len(PROMPTS) + [sampled],
                                    use_tqdm=False)
        return await asyncio.gather(offline, *[_collect(s, f) for s, f in zip(streams, firsts)])

    offline, *online = asyncio.run(main())
    for ref, (texts, token_ids, reasons) in zip(offline, online):
        assert sorted(texts) == [c.index for c in ref.outputs]
        for c in ref.outputs:
            assert texts[c.index] == c.text and token_ids[c.index] == c.token_ids
            assert reasons[c.index] == c.finish_reason
    assert engine.get_num_unfinished_requests() == 0


def test_abort_frees_kv_blocks_at_once(engine):
    async def main():
        params = _params(temperature=0.0, max_tokens=200, ignore_eos=True)
        streams = [engine.add_request(f"long{i}", PROMPTS[i % 4], params) for i in range(6)]
        for stream in streams:
            await stream.__anext__()  # every request is running and holds blocks
        assert engine.engine_core.core.scheduler.kv_cache_manager.get_num_free_blocks() < NUM_BLOCKS
        for stream in streams[:3]:
            stream.abort()
        generators = [engine.generate(PROMPTS[0], params, f"gen{i}") for i in range(3)]
        for gen in generators:
            await gen.__anext__()
            await gen.aclose()  # leaving a generate() early aborts too
        for stream in streams[3:]:
            engine.abort(stream.request_id)
            with pytest.raises(RequestAbortedError):
                async for _ in stream:
                    pass
        start = time.monotonic()
        scheduler = _wait_idle(engine)
        return time.monotonic() - start, scheduler

    elapsed, scheduler = asyncio.run(main())
    assert scheduler.kv_cache_manager.get_num_free_blocks() == NUM_BLOCKS
    assert elapsed < 2.0  # freed at the next step, not after 200 tokens
    assert engine.get_num_unfinished_requests() == 0 and not engine.output_processor.request_states


def test_stop_string_ends_the_core_request(engine, model_dir):
    async def main():
        texts, _, _ = await _collect(engine.add_request("ref", PROMPTS[1], _params(temperature=0.0, max_tokens=16)))
        text = texts[0]
        stop = text[4:7]
        stopped = await _collect(engine.add_request("stop", PROMPTS[1], _params(temperature=0.0, max_tokens=16,
                                                                                stop=[stop])))
        return text, stop, stopped

    text, stop, (texts, _, reasons) = asyncio.run(main())
    assert texts[0] == text[: text.index(stop)] and reasons[0] == "stop"
    assert not _wait_idle(engine).requests


def test_add_request_validates_before_queueing(engine, model_dir):
    async def main():
        with pytest.raises(ValueError, match="maximum context length"):
            engine.add_request("too-long", "Hello " * 300, _params())
        with pytest.raises(ValueError, match="out of vocabulary"):
            engine.add_request("oov", [1, 10**6], _params())
        engine.add_request("dup", "Hi", _params(max_tokens=2))
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("dup", "Hi", _params(max_tokens=2))
        engine.abort("dup")

    asyncio.run(main())
    small = AsyncLLM.from_engine_args(EngineArgs(model=model_dir, num_gpu_blocks_override=4), log_requests=False)
    try:
        async def too_big():
            with pytest.raises(ValueError, match="KV cache holds 64"):
                small.add_request("big", "Hello", _params(max_tokens=100))

        asyncio.run(too_big())
    finally:
        small.shutdown()


def test_engine_failure_fails_streams_and_health(model_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=model_dir, num_gpu_blocks_override=64), log_requests=False)
    try:
        def broken(scheduler_output):
            raise RuntimeError("injected fault")

        engine.engine_core.core.model_executor.execute_model = broken

        async def main():
            stream = engine.add_request("doomed", "Hello", _params())
            with pytest.raises(EngineDeadError, match="injected fault"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):
                engine.add_request("late", "Hello", _params())

        asyncio.run(asyncio.wait_for(main(), 10))
        with pytest.raises(EngineDeadError):
            engine.check_health()
    finally:
        engine.shutdown()


def test_merge_delta_concatenates_unread_outputs():
    lp = {7: Logprob(-0.5, 1, "a")}
    first = RequestOutput("r", "p", [1], None, [CompletionOutput(0, "ab", [7, 8], -1.0, [lp, lp])], False)
    second = RequestOutput("r", "p", [1], None, [CompletionOutput(0, "c", [9], -1.5, [lp], "length"),
                                                 CompletionOutput(1, "x", [3], -0.1, [lp])], True)
    merge_delta(first, second)
    a, b = first.outputs
    assert (a.text, a.token_ids, len(a.logprobs), a.cumulative_logprob, a.finish_reason) == \
        ("abc", [7, 8, 9], 3, -1.5, "length")
    assert b.index == 1 and b.text == "x" and first.finished
