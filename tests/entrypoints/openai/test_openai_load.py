"""Load: 200 concurrent streams share the engine; 50 clients that vanish mid-stream are aborted and free their KV."""
import asyncio
import time

import httpx
from server_testutils import API_KEY, MODEL, NUM_BLOCKS, metric, parse_metrics

PROMPT = "A paged KV cache stores keys and values"
NUM_STREAMS, NUM_TOKENS = 200, 16
NUM_DISCONNECTS, LONG_TOKENS = 50, 200


def _wait_idle(server, timeout=20.0):
    deadline = time.monotonic() + timeout
    while server.engine.get_num_unfinished_requests() or server.core.scheduler.has_unfinished_requests():
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.02)


async def _stream(async_client):
    stream = await async_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage, num_chunks = "", None, 0
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            num_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage, num_chunks


async def _disconnect_after_first_token(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                return  # leaving the block closes the connection with the body unread


def test_concurrent_streams_and_disconnects(server, client, async_client):
    reference = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
    num_prompt_tokens = reference.usage.prompt_tokens
    before = parse_metrics(httpx.get(server.url + "/metrics").text)
    core = server.core
    step = core.step
    widths = []  # requests that got a token, per engine step

    def counting_step():
        outputs = step()
        widths.append(sum(1 for o in outputs if o.new_token_ids))
        return outputs

    core.step = counting_step  # the engine thread is idle: it picks this up at its next step

    async def run():
        limits = httpx.Limits(max_connections=NUM_DISCONNECTS)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            return await asyncio.gather(*[_stream(async_client) for _ in range(NUM_STREAMS)],
                                        *[_disconnect_after_first_token(http) for _ in range(NUM_DISCONNECTS)])

    try:
        results = asyncio.run(run())[:NUM_STREAMS]
    finally:
        del core.step
    for text, usage, num_chunks in results:
        assert text == reference.choices[0].text
        assert usage.completion_tokens == NUM_TOKENS and usage.prompt_tokens == num_prompt_tokens
        assert 1 <= num_chunks <= NUM_TOKENS

    _wait_idle(server)
    # Continuous batching: the requests share steps (one step per token would need 200 * 16 + 50 steps).
    assert max(widths) >= NUM_STREAMS // 2
    assert sum(widths) >= NUM_STREAMS * NUM_TOKENS and len(widths) < NUM_STREAMS * NUM_TOKENS // 10
    kv_cache_manager = server.core.scheduler.kv_cache_manager
    assert kv_cache_manager.get_num_free_blocks() == NUM_BLOCKS and not kv_cache_manager.req_to_blocks
    assert not server.engine.output_processor.request_states
    after = parse_metrics(httpx.get(server.url + "/metrics").text)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    # The 50 long requests never reached their length: they were aborted, not run to the end.
    assert delta("graphserve:request_success_total", finished_reason="length") == NUM_STREAMS
    assert delta("graphserve:request_success_total", finished_reason="abort") == NUM_DISCONNECTS
    assert delta("graphserve:request_success_total", finished_reason="stop") == 0
    assert delta("graphserve:e2e_request_latency_seconds_count") == NUM_STREAMS + NUM_DISCONNECTS
    assert delta("graphserve:time_to_first_token_seconds_count") == NUM_STREAMS + NUM_DISCONNECTS
    assert delta("graphserve:prompt_tokens_total") == (NUM_STREAMS + NUM_DISCONNECTS) * num_prompt_tokens
    generated = delta("graphserve:generation_tokens_total")
    assert generated == delta("graphserve:request_generation_tokens_sum")
    assert NUM_STREAMS * NUM_TOKENS + NUM_DISCONNECTS <= generated < NUM_STREAMS * NUM_TOKENS + \
        NUM_DISCONNECTS * LONG_TOKENS
    assert metric(after, "graphserve:num_requests_running") == 0
    assert metric(after, "graphserve:num_requests_waiting") == 0
    assert metric(after, "graphserve:kv_cache_usage_perc") == 0
