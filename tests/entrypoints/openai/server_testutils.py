"""Helpers of the server tests: an in-process uvicorn server on its own thread, metrics parsing."""
import argparse
import asyncio
import threading
import time

from graphserve.entrypoints.openai.api_server import base_url, build_server
from graphserve.entrypoints.openai.cli_args import make_arg_parser

API_KEY = "test-key"
MODEL = "tiny"
NUM_BLOCKS = 1024


class ServerHandle:
    """An in-process server running on its own thread and event loop."""

    def __init__(self, argv, before_start=None, wait_ready=True):
        args = make_arg_parser(argparse.ArgumentParser()).parse_args(argv)
        self.server, sock, self.app = build_server(args)
        self.state = self.app.state.server
        self.url = base_url(sock, args.host)
        if before_start is not None:
            before_start(self)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not self.state.ready:
            if self.state.load_error is not None:
                raise RuntimeError("server failed to start") from self.state.load_error
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(0.02)

    @property
    def engine(self):
        return self.state.engine

    @property
    def core(self):
        """The EngineCore (read it only while the engine is idle)."""
        return self.engine.engine_core.core

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def server_argv(model_dir, *extra, num_blocks=NUM_BLOCKS):
    """`serve` flags for a quiet test server on an ephemeral port (num_blocks=None: size the KV pool normally)."""
    blocks = ["--num-gpu-blocks-override", str(num_blocks)] if num_blocks is not None else []
    return [model_dir, "--host", "127.0.0.1", "--port", "0", "--served-model-name", MODEL, "tiny-alias", *blocks,
            "--uvicorn-log-level", "warning", "--disable-log-requests", *extra]


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset(labels)): value}, without the model_name label."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "model_name")
            values[(sample.name, labels)] = sample.value
    return values


def metric(values, name, **labels):
    return values.get((name, frozenset(labels.items())), 0.0)
