"""The server through the official openai client, checked against the offline LLM on the same tiny model."""
import httpx
import pytest
from server_testutils import API_KEY, MODEL, metric, parse_metrics

from graphserve import LLM, SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name the capital of Italy."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(tiny_llama_dir, num_gpu_blocks_override=256)


def greedy(llm, prompt=PROMPT, max_tokens=16, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False)[0]


def test_completion_greedy_matches_offline(client, llm):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = greedy(llm, max_tokens=12)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == MODEL and resp.id.startswith("cmpl-") and resp.object == "text_completion"


def test_chat_greedy_matches_offline(client, llm):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    ref = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"


def test_completion_stream_equals_plain(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert len(content) > 1  # streamed token by token, not in one piece
    assert "".join(c.choices[0].text for c in content) == plain.choices[0].text
    assert content[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_stream_equals_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # Without stream_options no usage chunk is sent.
    bare = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.usage is None and c.choices for c in bare)


def test_n2_plain_and_streamed(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    resp = client.completions.create(**kwargs)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 16 and resp.choices[0].text != resp.choices[1].text
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in resp.choices]  # seeded: reproducible
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, stream=True,
                                                extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert set(texts) == {0, 1} and all(texts.values())


def test_prompt_forms(client, llm):
    tok = llm.get_tokenizer()
    ids = tok(PROMPT).input_ids
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == single and by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == single
    assert batch.choices[1].text == greedy(llm, "Hello there", 6).outputs[0].text
    id_batch = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert id_batch.choices[0].text == single and id_batch.usage.prompt_tokens == len(ids) + 3
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], max_tokens=6,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: batch.choices[0].text, 1: batch.choices[1].text}


def test_stop_strings(client, llm):
    full = greedy(llm, max_tokens=16).outputs[0].text
    stop = full[6:9]
    cut = full[: full.index(stop)]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert resp.choices[0].text == cut
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].model_dump()["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut
    kept = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop


def test_completion_logprobs_legacy_shape(client, llm):
    ref = greedy(llm, max_tokens=6, logprobs=3).outputs[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for i, token_id in enumerate(ref.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(ref.logprobs[i][token_id].logprob, abs=1e-4)
        assert lp.tokens[i] in lp.top_logprobs[i] and 3 <= len(lp.top_logprobs[i]) <= 4
    assert lp.text_offset == sorted(lp.text_offset)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                       echo=True)
    choice = echoed.choices[0]
    num_prompt = echoed.usage.prompt_tokens
    assert choice.text.startswith(PROMPT) and choice.text[len(PROMPT):] == resp.choices[0].text
    assert len(choice.logprobs.tokens) == num_prompt + 6
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])
    only_prompt = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert only_prompt.choices[0].text == PROMPT and only_prompt.usage.completion_tokens == 0


def test_chat_logprobs_openai_shape(client, llm):
    ref = llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=5, logprobs=2), use_tqdm=False)[0].outputs[0]
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) == 5
    for entry, token_id, step in zip(content, ref.token_ids, ref.logprobs):
        assert entry.logprob == pytest.approx(step[token_id].logprob, abs=1e-4)
        assert entry.token == step[token_id].decoded_token and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    streamed = [e for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    bare = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_extra_body_sampling_fields(client, llm):
    ref = greedy(llm, max_tokens=8)
    top1 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == ref.outputs[0].text  # top_k=1 is greedy
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True, "min_tokens": 10, "min_p": 0.0,
                                                   "repetition_penalty": 1.0, "skip_special_tokens": False,
                                                   "spaces_between_special_tokens": True})
    assert forced.usage.completion_tokens == 10
    stop_id = ref.outputs[0].token_ids[2]
    first_stop = ref.outputs[0].token_ids.index(stop_id)
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == first_stop + 1
    assert stopped.choices[0].model_dump()["stop_reason"] == stop_id
    penalized = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                          extra_body={"repetition_penalty": 1.9, "ignore_eos": True})
    assert penalized.usage.completion_tokens == 8
    assert penalized.choices[0].text == greedy(llm, max_tokens=8, repetition_penalty=1.9,
                                               ignore_eos=True).outputs[0].text
    biased = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logit_bias={"42": 100})
    assert biased.choices[0].text == greedy(llm, max_tokens=4, logit_bias={42: 100}).outputs[0].text


def test_best_of_and_max_completion_tokens(client):
    best = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=1, best_of=3, temperature=1.0,
                                     seed=3)
    assert len(best.choices) == 1 and best.usage.completion_tokens <= 5
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=1, best_of=3,
                                              temperature=1.0, seed=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == best.choices[0].text
    capped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, max_completion_tokens=3,
                                            extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == 3  # max_completion_tokens wins over the deprecated max_tokens


def test_chat_without_max_tokens_fills_the_context(client, server):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
    max_model_len = server.engine.model_config.max_model_len
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == max_model_len


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "tiny-alias"]
    assert models.data[0].model_dump()["max_model_len"] == 256
    resp = client.completions.create(model="tiny-alias", prompt=PROMPT, max_tokens=2)
    assert resp.model == MODEL  # responses report the first served name


def test_tokenize_and_detokenize(server, llm):
    tok = llm.get_tokenizer()
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True}).json()
        assert r["tokens"] == tok(PROMPT).input_ids and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 256 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert chat["tokens"] == tok(text, add_special_tokens=False).input_ids
        back = http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
        assert back["prompt"] == tok.decode(r["tokens"])


def test_health_version_metrics_need_no_key(server, client):
    before = parse_metrics(httpx.get(server.url + "/metrics").text)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                                     extra_body={"ignore_eos": True})
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = parse_metrics(r.text)
    assert metric(after, "graphserve:generation_tokens_total") - \
        metric(before, "graphserve:generation_tokens_total") == 7
    assert metric(after, "graphserve:prompt_tokens_total") - \
        metric(before, "graphserve:prompt_tokens_total") == resp.usage.prompt_tokens
    assert metric(after, "graphserve:request_success_total", finished_reason="length") - \
        metric(before, "graphserve:request_success_total", finished_reason="length") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert metric(after, f"graphserve:{name}_count") - metric(before, f"graphserve:{name}_count") == 1, name
    assert metric(after, "graphserve:inter_token_latency_seconds_count") - \
        metric(before, "graphserve:inter_token_latency_seconds_count") == 6
    assert metric(after, "graphserve:num_requests_running") == 0
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_cache_salt_and_reset_prefix_cache(server, client):
    def hits():
        return metric(parse_metrics(httpx.get(server.url + "/metrics").text), "graphserve:prefix_cache_hits_total")

    prompt = PROMPT * 10  # several full KV blocks

    def complete(**extra):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                         extra_body=extra).choices[0].text

    plain = complete()
    before = hits()
    assert complete() == plain and hits() > before  # the same prefix again: served from the cache
    before = hits()
    assert complete(cache_salt="tenant-a") == plain and hits() == before  # another tenant: no sharing
    assert complete(cache_salt="tenant-a") == plain and hits() > before  # its own prefix: shared
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                          extra_body={"cache_salt": "tenant-a"})
    assert chat.choices[0].message.content is not None
    assert httpx.post(server.url + "/reset_prefix_cache").status_code == 401
    r = httpx.post(server.url + "/reset_prefix_cache", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"success": True}
    assert server.core.scheduler.kv_cache_manager.block_pool.num_cached_blocks == 0
    before = hits()
    assert complete() == plain and hits() == before  # the cache is empty now
