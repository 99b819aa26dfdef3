"""Bad requests: each gets the right status and OpenAI's nested error body, and the server keeps serving."""
import json

import httpx
import pytest
from server_testutils import API_KEY, MODEL, metric, parse_metrics

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
CONTEXT = "This model's maximum context length is 256 tokens"


def cmpl(**fields):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **fields}


# (id, path, body: dict | bytes, headers, status, param or None, text the message must contain)
CASES = [
    ("prompt-int", CMPL, cmpl(prompt=42), AUTH, 400, "prompt", "prompt"),
    ("prompt-missing", CMPL, {"model": MODEL}, AUTH, 400, "prompt", "Field required"),
    ("prompt-empty-str", CMPL, cmpl(prompt=""), AUTH, 400, "prompt", "empty"),
    ("prompt-empty-list", CMPL, cmpl(prompt=[]), AUTH, 400, "prompt", "empty"),
    ("prompt-bool-ids", CMPL, cmpl(prompt=[True, False]), AUTH, 400, "prompt", ""),
    ("prompt-mixed-list", CMPL, cmpl(prompt=[1, "a"]), AUTH, 400, "prompt", ""),
    ("token-out-of-vocab", CMPL, cmpl(prompt=[5, 100000]), AUTH, 400, None, "out of vocabulary"),
    ("negative-token-id", CMPL, cmpl(prompt=[-3]), AUTH, 400, None, "out of vocabulary"),
    ("prompt-too-long", CMPL, cmpl(prompt="Hello " * 400), AUTH, 400, None, CONTEXT),
    ("max-tokens-huge", CMPL, cmpl(max_tokens=10**9), AUTH, 400, None, CONTEXT),
    ("max-tokens-negative", CMPL, cmpl(max_tokens=-1), AUTH, 400, "max_tokens", "max_tokens"),
    ("max-tokens-string", CMPL, cmpl(max_tokens="10"), AUTH, 400, "max_tokens", "valid integer"),
    ("temperature-string", CMPL, cmpl(temperature="hot"), AUTH, 400, "temperature", "valid number"),
    ("temperature-negative", CMPL, cmpl(temperature=-0.5), AUTH, 400, "temperature", "non-negative"),
    ("top-p-over-1", CMPL, cmpl(top_p=1.5), AUTH, 400, "top_p", "top_p"),
    ("top-k-invalid", CMPL, cmpl(top_k=-5), AUTH, 400, "top_k", "top_k"),
    ("min-p-over-1", CMPL, cmpl(min_p=2.0), AUTH, 400, "min_p", "min_p"),
    ("presence-penalty", CMPL, cmpl(presence_penalty=3.0), AUTH, 400, "presence_penalty", "[-2, 2]"),
    ("repetition-penalty-0", CMPL, cmpl(repetition_penalty=0.0), AUTH, 400, "repetition_penalty", ""),
    ("n-over-limit", CMPL, cmpl(n=5, temperature=1.0), AUTH, 400, "n", "at most 4"),
    ("n-bool", CMPL, cmpl(n=True), AUTH, 400, "n", "valid integer"),
    ("n-greedy", CMPL, cmpl(n=2, temperature=0.0), AUTH, 400, "n", "greedy"),
    ("best-of-below-n", CMPL, cmpl(n=3, best_of=2, temperature=1.0), AUTH, 400, "best_of", "best_of"),
    ("logprobs-over-20", CMPL, cmpl(logprobs=21), AUTH, 400, "logprobs", "at most 20"),
    ("stop-empty-string", CMPL, cmpl(stop=[""]), AUTH, 400, "stop", "non-empty"),
    ("stop-token-negative", CMPL, cmpl(stop_token_ids=[-1]), AUTH, 400, "stop_token_ids", ""),
    ("min-tokens-over-max", CMPL, cmpl(min_tokens=9), AUTH, 400, "min_tokens", "min_tokens"),
    ("logit-bias-key", CMPL, cmpl(logit_bias={"x": 1}), AUTH, 400, "logit_bias", "token ids"),
    ("logit-bias-range", CMPL, cmpl(logit_bias={"1": 500}), AUTH, 400, "logit_bias", "[-100, 100]"),
    ("seed-over-int64", CMPL, cmpl(seed=2**64), AUTH, 400, "seed", ""),
    ("ignore-eos-string", CMPL, cmpl(ignore_eos="yes"), AUTH, 400, "ignore_eos", "valid boolean"),
    ("suffix", CMPL, cmpl(suffix="!"), AUTH, 400, "suffix", "not currently supported"),
    ("stream-options-no-stream", CMPL, cmpl(stream_options={"include_usage": True}), AUTH, 400, None, "stream"),
    ("empty-cache-salt", CMPL, cmpl(cache_salt=""), AUTH, 400, None, "cache_salt"),
    ("unknown-model", CMPL, cmpl(model="gpt-4"), AUTH, 404, "model", "The model `gpt-4` does not exist."),
    ("messages-empty", CHAT, chat(messages=[]), AUTH, 400, "messages", "non-empty"),
    ("messages-missing", CHAT, {"model": MODEL}, AUTH, 400, "messages", "Field required"),
    ("messages-string", CHAT, chat(messages="hello"), AUTH, 400, "messages", "valid list"),
    ("unknown-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400, "messages", "role"),
    ("content-int", CHAT, chat(messages=[{"role": "user", "content": 42}]), AUTH, 400, "messages", "content"),
    ("content-image-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), AUTH, 400,
     "messages", "text"),
    ("top-logprobs-alone", CHAT, chat(top_logprobs=2), AUTH, 400, "top_logprobs", "logprobs"),
    ("top-logprobs-over-20", CHAT, chat(logprobs=True, top_logprobs=30), AUTH, 400, "logprobs", "at most 20"),
    ("max-completion-tokens-0", CHAT, chat(max_completion_tokens=0), AUTH, 400, "max_tokens", "at least 1"),
    ("chat-unknown-model", CHAT, chat(model="nope"), AUTH, 404, "model", "does not exist"),
    ("chat-context", CHAT, chat(messages=[{"role": "user", "content": "Hello " * 400}]), AUTH, 400, None, CONTEXT),
    ("malformed-json", CHAT, b'{"model": "tiny", "messages": [', AUTH, 400, None, "Invalid JSON"),
    ("invalid-utf8", CMPL, b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}', AUTH, 400, None, ""),
    ("json-array-body", CMPL, b"[1, 2, 3]", AUTH, 400, None, ""),
    ("no-api-key", CMPL, cmpl(), {}, 401, None, "Unauthorized"),
    ("wrong-api-key", CMPL, cmpl(), {"Authorization": "Bearer test-kez"}, 401, None, "Unauthorized"),
    ("wrong-auth-scheme", CHAT, chat(), {"Authorization": f"Basic {API_KEY}"}, 401, None, "Unauthorized"),
    ("tokenize-both", "/tokenize", {"prompt": "a", "messages": MSG}, AUTH, 400, None, "exactly one"),
    ("tokenize-no-key", "/tokenize", {"prompt": "a"}, {}, 401, None, "Unauthorized"),
    ("detokenize-bad-id", "/detokenize", {"tokens": [-1]}, AUTH, 400, "tokens", "out of vocabulary"),
    ("detokenize-strings", "/detokenize", {"tokens": ["a"]}, AUTH, 400, "tokens", "valid integer"),
]


def _post(http, path, body, headers):
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    return http.post(path, json=body, headers=headers)


def assert_error_body(response, status, param=None, text=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert text in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_table_has_enough_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, case):
    _, path, body, headers, status, param, text = case
    assert_error_body(_post(http, path, body, headers), status, param, text)


def test_other_http_errors(http):
    assert_error_body(http.get(CMPL, headers=AUTH), 405)
    assert_error_body(http.get("/v1/nope", headers=AUTH), 404)
    big = json.dumps(cmpl(prompt="x" * (9 << 20))).encode()
    assert_error_body(_post(http, CMPL, big, AUTH), 413, text="larger than")


def test_openai_client_raises_typed_errors(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=10**6)
    assert CONTEXT in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_server_still_serves_after_bad_requests(http, server):
    for case in CASES:
        _post(http, case[1], case[2], case[3])
    ok = http.post(CMPL, json=cmpl(max_tokens=5, temperature=0.0, ignore_eos=True), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    stream = http.post(CHAT, json=chat(stream=True), headers=AUTH)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert http.get("/health").status_code == 200
    values = parse_metrics(http.get("/metrics").text)
    assert metric(values, "graphserve:num_requests_running") == 0
    assert metric(values, "graphserve:num_requests_waiting") == 0
    assert server.engine.get_num_unfinished_requests() == 0


def test_a_template_that_fails_on_the_messages_is_a_400(tiny_llama_dir):
    from server_testutils import ServerHandle, server_argv

    template = "{% for m in messages %}{{ m['content'] }}{{ m['weight'] + 1 }}{% endfor %}"
    handle = ServerHandle(server_argv(tiny_llama_dir, "--chat-template", template))
    try:
        messages = [{"role": "user", "content": "hi", "weight": "heavy"}]  # str + int inside the template
        r = httpx.post(handle.url + CHAT, json={"messages": messages})
        assert_error_body(r, 400, "messages", "TypeError")
        r = httpx.post(handle.url + "/tokenize", json={"messages": messages})
        assert_error_body(r, 400, "messages", "TypeError")
        ok = httpx.post(handle.url + CHAT, json={"messages": [{"role": "user", "content": "hi", "weight": 1}],
                                                 "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        handle.stop()
