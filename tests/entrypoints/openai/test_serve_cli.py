"""`graphserve serve` flags: help, validation, API key from the environment, CORS, the start-up banner."""
import argparse

import httpx
import pytest

from graphserve.entrypoints.cli import build_parser
from graphserve.entrypoints.openai.api_server import settings_from_args, usage_banner
from graphserve.entrypoints.openai.cli_args import make_arg_parser, validate_serve_args

SERVER_FLAGS = ["--host", "--port", "--served-model-name", "--api-key", "--response-role", "--disable-log-requests",
                "--uvicorn-log-level", "--allowed-origins", "--allowed-methods", "--allowed-headers",
                "--allow-credentials", "--max-n", "--max-request-size", "--shutdown-timeout"]
ENGINE_FLAGS = ["--model", "--chat-template", "--dtype", "--max-model-len", "--max-num-seqs",
                "--max-num-batched-tokens", "--block-size", "--seed", "--kv-cache-memory"]


def parse(*argv):
    return make_arg_parser(argparse.ArgumentParser()).parse_args(list(argv))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in SERVER_FLAGS + ENGINE_FLAGS:
        assert flag in text, flag
    parser = make_arg_parser(argparse.ArgumentParser())
    undocumented = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
    assert undocumented == []


def test_validation():
    args = parse("/some/dir")
    validate_serve_args(args)
    assert args.model == "/some/dir"
    with pytest.raises(ValueError, match="given twice"):
        validate_serve_args(parse("/a", "--model", "/b"))
    for argv, match in ((["--port", "70000"], "--port"), (["--max-n", "0"], "--max-n"),
                        (["--shutdown-timeout", "-1"], "--shutdown-timeout"), (["--api-key", ""], "--api-key")):
        with pytest.raises(ValueError, match=match):
            validate_serve_args(parse(*argv))
    with pytest.raises(SystemExit):
        parse("--allowed-origins", "not json")
    assert parse("--allowed-origins", '["https://a.example"]').allowed_origins == ["https://a.example"]
    assert parse("--max-request-size", "1MiB").max_request_size == 1 << 20


def test_settings_api_key_and_names(monkeypatch):
    monkeypatch.delenv("GRAPHSERVE_API_KEY", raising=False)
    args = parse()
    validate_serve_args(args)
    settings = settings_from_args(args)
    assert settings.api_key is None and settings.served_model_names == ["SmolLM2-135M-Instruct"]
    monkeypatch.setenv("GRAPHSERVE_API_KEY", "from-env")
    assert settings_from_args(args).api_key == "from-env"
    args = parse("/models/x", "--api-key", "from-flag", "--served-model-name", "a", "b")
    validate_serve_args(args)
    settings = settings_from_args(args)
    assert settings.api_key == "from-flag" and settings.served_model_names == ["a", "b"]
    args = parse("/models/x")
    validate_serve_args(args)
    assert settings_from_args(args).served_model_names == ["/models/x"]


def test_banner_shows_a_working_curl():
    text = usage_banner("http://localhost:8000", "SmolLM2-135M-Instruct", api_key=False)
    assert "curl http://localhost:8000/v1/chat/completions" in text and "Authorization" not in text
    assert "capital of France" in text and '"model": "SmolLM2-135M-Instruct"' in text
    assert "Authorization: Bearer $GRAPHSERVE_API_KEY" in usage_banner("http://h:1", "m", api_key=True)


def test_cors_preflight_needs_no_key(server):
    r = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
