"""LoRA adapters through the OpenAI-compatible server: --lora-modules, `model=<adapter>`, /v1/models and the
load / unload endpoints, with each adapter's greedy output checked against transformers + peft."""
from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest

from tests.entrypoints.openai.server_testutils import API_KEY, MODEL, ServerHandle, server_argv
from tests.lora.lora_testutils import reference_greedy, write_peft_adapter

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = [5, 6, 7, 8, 9, 10, 11]
NEW = 6
SPECS = {
    "attn": dict(r=8, target_modules=["q_proj", "v_proj"], lora_alpha=16, seed=1),
    "mlp": dict(r=4, target_modules=["gate_proj", "down_proj", "k_proj"], lora_alpha=8, seed=2),
    "late": dict(r=8, target_modules=["o_proj", "up_proj"], lora_alpha=16, seed=3),
}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """(checkpoint dir, base HF model, {name: (adapter dir, PeftModel)}, dir of broken adapters, tokenizer)."""
    from transformers import AutoTokenizer

    path, hf_model = tiny_model("llama")
    root = tmp_path_factory.mktemp("server-adapters")
    made = {name: (str(root / name), write_peft_adapter(hf_model, str(root / name), **spec))
            for name, spec in SPECS.items()}
    truncated = str(root / "truncated")
    shutil.copytree(made["attn"][0], truncated)
    weights = os.path.join(truncated, "adapter_model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    write_peft_adapter(hf_model, str(root / "rank16"), r=16, target_modules=["q_proj"], lora_alpha=16, seed=4)
    return path, hf_model, made, root, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def server(setup):
    path, _, made, _, _ = setup
    json_module = json.dumps({"name": "mlp", "path": made["mlp"][0], "base_model_name": MODEL})
    handle = ServerHandle(server_argv(path, "--api-key", API_KEY, "--dtype", "float32", "--enable-lora",
                                      "--max-loras", "2", "--max-lora-rank", "8",
                                      "--lora-modules", f"attn={made['attn'][0]}", json_module))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def _complete(client, model, prompt=PROMPT, n=NEW):
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == n and resp.model == model
    return resp.choices[0].text


def test_each_adapter_by_model_name_matches_peft(setup, client):
    _, hf_model, made, _, tok = setup
    base = reference_greedy(hf_model, PROMPT, NEW)
    assert _complete(client, MODEL) == _text(tok, base)
    for name in ("attn", "mlp"):
        expected = reference_greedy(made[name][1], PROMPT, NEW)
        assert expected != base  # the adapter changes the output (the check would be void otherwise)
        assert _complete(client, name) == _text(tok, expected)


def test_chat_and_tokenize_with_an_adapter(setup, client, http):
    _, _, made, _, tok = setup
    messages = [{"role": "user", "content": "Name the capital of Italy."}]
    ids = http.post("/tokenize", json={"model": "mlp", "messages": messages}).json()["tokens"]
    resp = client.chat.completions.create(model="mlp", messages=messages, max_tokens=NEW, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.model == "mlp" and resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == _text(tok, reference_greedy(made["mlp"][1], ids, NEW))


def test_models_lists_adapters_with_parent(setup, client):
    _, _, made, _, _ = setup
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(cards) == [MODEL, "tiny-alias", "attn", "mlp"]
    for name in ("attn", "mlp"):
        assert cards[name]["root"] == made[name][0] and cards[name]["parent"] == MODEL
    assert cards[MODEL]["parent"] is None


def test_unknown_model_is_404(http):
    r = http.post("/v1/completions", json={"model": "xyz", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model `xyz` does not exist.", "type": "NotFoundError",
                                  "param": "model", "code": 404}}
    assert http.post("/tokenize", json={"model": "xyz", "prompt": "hi"}).status_code == 404


def test_load_use_unload(setup, server, client, http):
    _, _, made, _, tok = setup
    late_dir, late_model = made["late"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": late_dir})
    assert r.status_code == 200 and "late" in r.text
    first_id = server.state.models.lora_requests["late"].lora_int_id
    assert first_id == 3  # after attn (1) and mlp (2)
    assert _complete(client, "late") == _text(tok, reference_greedy(late_model, PROMPT, NEW))
    assert [m.id for m in client.models.list().data][-1] == "late"
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": late_dir})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    # A request running with the adapter finishes with it after the unload; new ones get 404.
    long = 96
    stream = client.completions.create(model="late", prompt=PROMPT, max_tokens=long, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 200 and "late" in r.text
    assert server.engine.get_num_unfinished_requests() == 1  # unloaded while the request runs
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _text(tok, reference_greedy(late_model, PROMPT, long))
    with pytest.raises(openai.NotFoundError, match="The model `late` does not exist"):
        client.completions.create(model="late", prompt=PROMPT, max_tokens=2)
    assert "late" not in [m.id for m in client.models.list().data]
    missing = http.post("/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    # Loaded again, it gets a fresh engine id (ids are never reused).
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": late_dir}).status_code == 200
    assert server.state.models.lora_requests["late"].lora_int_id > first_id
    wrong_id = http.post("/v1/unload_lora_adapter", json={"lora_name": "late", "lora_int_id": first_id})
    assert wrong_id.status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot read adapter_model.safetensors"),
    ("rank16", "above max_lora_rank=8"),
    ("missing", "not a directory"),
])
def test_bad_adapter_is_400_and_the_server_keeps_serving(setup, client, http, case, message):
    _, hf_model, _, root, tok = setup
    r = http.post("/v1/load_lora_adapter", json={"lora_name": case, "lora_path": str(root / case)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert message in error["message"] and case in error["message"] and error["type"] == "BadRequestError"
    assert case not in [m.id for m in client.models.list().data]
    assert _complete(client, MODEL) == _text(tok, reference_greedy(hf_model, PROMPT, NEW))


@pytest.mark.parametrize("body, message", [
    ({"lora_name": "x"}, "lora_path"),
    ({"lora_path": "/tmp"}, "lora_name"),
    ({"lora_name": MODEL, "lora_path": "/tmp"}, "served model name"),
    ({"lora_name": "", "lora_path": "/tmp"}, "lora_name"),
])
def test_load_bad_fields_is_400(http, body, message):
    r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={}).status_code == 400


def test_load_and_unload_need_the_api_key(setup, server):
    _, _, made, _, _ = setup
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": made["late"][0]}),
                       ("/v1/unload_lora_adapter", {"lora_name": "attn"})):
        assert httpx.post(server.url + path, json=body).status_code == 401
        assert httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer no"}).status_code == 401
    assert "attn" in server.state.models.lora_requests and "late" not in server.state.models.lora_requests


def test_start_up_checks(setup):
    path, _, made, root, _ = setup
    with pytest.raises(ValueError, match="--lora-modules needs --enable-lora"):
        ServerHandle(server_argv(path, "--lora-modules", f"attn={made['attn'][0]}"))
    with pytest.raises(ValueError, match="'truncated'.*cannot read adapter_model.safetensors"):
        ServerHandle(server_argv(path, "--enable-lora", "--lora-modules", f"truncated={root / 'truncated'}"))
    with pytest.raises(ValueError, match="names \\['a'\\] more than once"):
        ServerHandle(server_argv(path, "--enable-lora", "--lora-modules", f"a={made['attn'][0]}",
                                 f"a={made['mlp'][0]}"))
    with pytest.raises(SystemExit):  # argparse: neither name=path nor JSON
        ServerHandle(server_argv(path, "--enable-lora", "--lora-modules", "no-equals-sign"))


def test_lora_disabled_load_is_400(setup):
    path, _, made, _, _ = setup
    handle = ServerHandle(server_argv(path))
    try:
        r = httpx.post(handle.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": made["attn"][0]})
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
        assert httpx.post(handle.url + "/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
        r = httpx.post(handle.url + "/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404
    finally:
        handle.stop()
