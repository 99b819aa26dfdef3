"""Server lifecycle: 503 while the model loads and while draining, engine failure, graceful SIGTERM."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_testutils import ServerHandle, server_argv


def _wait_listening(url, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url + "/version", timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "server never answered"
            time.sleep(0.05)


def test_503_while_starting_and_draining(tiny_llama_dir):
    release = threading.Event()

    def hold_the_load(handle):
        build = handle.state._build_engine
        handle.state._build_engine = lambda: release.wait(30) and build()

    handle = ServerHandle(server_argv(tiny_llama_dir), before_start=hold_the_load, wait_ready=False)
    try:
        assert _wait_listening(handle.url).status_code == 200  # /version answers while loading
        for path in ("/health", "/v1/models"):
            r = httpx.get(handle.url + path)
            assert r.status_code == 503 and "starting" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == 503 and r.headers["retry-after"]
        r = httpx.post(handle.url + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503
        assert httpx.get(handle.url + "/metrics").status_code == 200
        release.set()
        handle.wait_ready()
        assert httpx.get(handle.url + "/health").status_code == 200
        handle.state.draining = True  # what the first SIGTERM does
        r = httpx.post(handle.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert r.headers["connection"] == "close"
        assert httpx.get(handle.url + "/health").status_code == 503
        assert httpx.get(handle.url + "/metrics").status_code == 200
    finally:
        release.set()
        handle.stop()


def test_engine_failure_fails_requests_and_reports_unhealthy(tiny_llama_dir):
    handle = ServerHandle(server_argv(tiny_llama_dir))
    try:
        executor = handle.core.model_executor
        execute_model = executor.execute_model
        fail = threading.Event()

        def faulty_execute_model(scheduler_output):
            if fail.is_set():
                raise RuntimeError("injected fault")
            return execute_model(scheduler_output)

        executor.execute_model = faulty_execute_model
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events = []
        with httpx.Client(base_url=handle.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        fail.set()  # the engine dies with this stream in flight
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 500 and "injected fault" in error["message"]
            r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
            assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
            health = http.get("/health")
            assert health.status_code == 500 and "injected fault" in health.json()["error"]["message"]
            assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400  # still a 400
    finally:
        handle.stop()


def test_engine_that_cannot_load_stops_the_server(tiny_llama_dir):
    # The config resolves (fail-fast checks pass) but the KV pool cannot hold one sequence: EngineCore raises on the
    # loading thread, and the server must exit instead of answering 503 forever.
    handle = ServerHandle(server_argv(tiny_llama_dir, "--kv-cache-memory", "1KiB", num_blocks=None),
                          wait_ready=False)
    handle.thread.join(60)
    assert not handle.thread.is_alive()
    assert isinstance(handle.state.load_error, ValueError) and "kv_cache_memory" in str(handle.state.load_error)
    assert not handle.state.ready


def _read_banner(proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r" at (http://\S+) ", line)
        if match:
            return match.group(1), lines
    raise AssertionError("no banner:\n" + "".join(lines))


def test_sigterm_finishes_requests_in_flight_and_exits_0(tiny_llama_dir, tmp_path):
    cmd = [sys.executable, "-m", "graphserve", "serve", tiny_llama_dir, "--host", "127.0.0.1", "--port", "0",
           "--num-gpu-blocks-override", "256", "--uvicorn-log-level", "warning"]
    log = open(tmp_path / "server.log", "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        try:
            url, _ = _read_banner(proc)
        except AssertionError:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
        body = {"prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        lines = []
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        if not lines:
                            proc.send_signal(signal.SIGTERM)
                        lines.append(line[len("data: "):])
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["usage"]["completion_tokens"] == 120  # finished, not cut off
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
