"""The OpenAI-compatible server: FastAPI app, engine start-up in the background, graceful shutdown.

Life of the server: the port is bound and uvicorn answers at once (503 while the model loads); the engine
(AsyncLLM) loads on a background thread and the endpoints open when it is ready. On SIGTERM/SIGINT the server
stops accepting connections, answers 503 to new requests on open ones, lets requests in flight finish for up to
--shutdown-timeout seconds (then aborts them), stops the engine and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from graphserve import __version__, envs
from graphserve.config import EngineConfig
from graphserve.engine.arg_utils import EngineArgs
from graphserve.engine.async_llm import AsyncLLM, EngineDeadError
from graphserve.entrypoints.openai.cli_args import validate_serve_args
from graphserve.entrypoints.openai.errors import OpenAIError, error_response, install_exception_handlers
from graphserve.entrypoints.openai.lora_modules import LoRAModulePath
from graphserve.entrypoints.openai.middleware import ServerGuardMiddleware
from graphserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from graphserve.entrypoints.openai.serving_chat import OpenAIServingChat
from graphserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from graphserve.entrypoints.openai.serving_lora import router as lora_router
from graphserve.entrypoints.openai.serving_models import OpenAIServingModels
from graphserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from graphserve.lora.peft import AdapterRegistry
from graphserve.metrics.loggers import LoggingStatLogger
from graphserve.metrics.prometheus import PrometheusStatLogger

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """What the app needs besides the engine config (from the server flags)."""

    served_model_names: list[str]
    api_key: str | None = None
    response_role: str = "assistant"
    log_requests: bool = True
    max_n: int = 16
    max_request_size: int = 8 << 20
    allowed_origins: tuple = ("*",)
    allowed_methods: tuple = ("*",)
    allowed_headers: tuple = ("*",)
    allow_credentials: bool = False
    log_stats_interval: float = 10.0
    lora_modules: tuple[LoRAModulePath, ...] = ()  # adapters served from the start (--lora-modules)


class ServerState:
    """The app's mutable state: the engine once loaded, the endpoint handlers, starting / draining flags."""

    def __init__(self, config: EngineConfig, settings: ServerSettings, chat_template: str | None) -> None:
        self.config = config
        self.settings = settings
        self.chat_template = chat_template
        self.prometheus = PrometheusStatLogger(settings.served_model_names[0], config.model_config.max_model_len)
        self.engine: AsyncLLM | None = None
        self.models: OpenAIServingModels | None = None
        self.load_error: BaseException | None = None
        self.ready = False
        self.draining = False
        self.on_ready: list = []  # callbacks(state) once the engine serves
        self.on_load_failure: list = []  # callbacks(state) when it could not load
        self._stats_task: asyncio.Task | None = None

    def _build_engine(self) -> AsyncLLM:
        return AsyncLLM(self.config, chat_template=self.chat_template, log_requests=self.settings.log_requests,
                        stat_loggers=[self.prometheus, LoggingStatLogger()])

    def _build_models(self, engine: AsyncLLM) -> OpenAIServingModels:
        """The served names and the --lora-modules adapters, checked through the engine's adapter registry."""
        s = self.settings
        return OpenAIServingModels(s.served_model_names, engine.model_config.model, engine.model_config.max_model_len,
                                   engine.input_processor.adapters, s.lora_modules)

    async def load_engine(self) -> None:
        """Load the model on a daemon thread (a shutdown during loading need not wait for it), then open."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(error: BaseException | None, engine: AsyncLLM | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(engine)

        def load() -> None:
            error, engine = None, None
            try:
                engine = self._build_engine()
                self.models = self._build_models(engine)
            except BaseException as e:  # noqa: BLE001 (handed to the loop)
                error = e
                if engine is not None:
                    engine.shutdown()
                    engine = None
            try:
                loop.call_soon_threadsafe(settle, error, engine)
            except RuntimeError:  # the server stopped while the model was loading: nobody waits any more
                if engine is not None:
                    engine.shutdown()

        threading.Thread(target=load, name="graphserve-engine-load", daemon=True).start()
        try:
            self.engine = await future
        except Exception as e:  # noqa: BLE001 (reported, then the server exits non-zero)
            logger.error("the engine failed to start: %s: %s", type(e).__name__, e, exc_info=e)
            self.load_error = e
            for callback in self.on_load_failure:
                callback(self)
            return
        self._open(self.engine)

    def _open(self, engine: AsyncLLM) -> None:
        s, models = self.settings, self.models
        self.completion = OpenAIServingCompletion(engine, models, s.max_n)
        self.chat = OpenAIServingChat(engine, models, s.max_n, response_role=s.response_role)
        self.tokenization = OpenAIServingTokenization(engine, models, s.max_n)
        if s.log_stats_interval > 0:
            self._stats_task = asyncio.get_running_loop().create_task(engine.run_stat_logging(s.log_stats_interval))
        self.ready = True
        for callback in self.on_ready:
            callback(self)

    def shutdown(self) -> None:
        """Stop the stats task and the engine (requests still in flight are aborted)."""
        self.ready = False
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.engine is not None:
            self.engine.shutdown()


def _state(request: Request) -> ServerState:
    return request.app.state.server


router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine can serve; 500 once it failed (503 while starting or draining)."""
    try:
        _state(request).engine.check_health()
    except EngineDeadError as e:
        return error_response(str(e), 500)
    return Response(status_code=200)


@router.get("/version")
async def version() -> JSONResponse:
    """The graphserve version."""
    return JSONResponse({"version": __version__})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics (graphserve:*)."""
    return Response(_state(request).prometheus.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def show_available_models(request: Request) -> JSONResponse:
    """The served model names and the loaded LoRA adapters."""
    return JSONResponse(_state(request).models.show_available_models().model_dump())


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    """OpenAI completions."""
    return await _state(raw_request).completion.create_completion(request, raw_request)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    """OpenAI chat completions."""
    return await _state(raw_request).chat.create_chat_completion(request, raw_request)


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> JSONResponse:
    """Token ids of a prompt or of chat messages."""
    return JSONResponse(_state(raw_request).tokenization.create_tokenize(request).model_dump())


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> JSONResponse:
    """Text of token ids."""
    return JSONResponse(_state(raw_request).tokenization.create_detokenize(request).model_dump())


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(raw_request: Request) -> JSONResponse:
    """Drop the prefix cache (admin; behind the API key). 409 while requests hold KV blocks."""
    try:
        done = await _state(raw_request).engine.reset_prefix_cache()
    except EngineDeadError as e:
        raise OpenAIError(str(e), 500) from None
    if not done:
        raise OpenAIError("The prefix cache cannot be reset while requests are running.", 409)
    return JSONResponse({"success": True})


def build_app(config: EngineConfig, settings: ServerSettings, chat_template: str | None = None) -> FastAPI:
    """The FastAPI app; the engine loads in the background once the app starts (lifespan)."""
    state = ServerState(config, settings, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        load_task = asyncio.get_running_loop().create_task(state.load_engine())
        yield
        load_task.cancel()
        state.shutdown()

    app = FastAPI(title="graphserve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_exception_handlers(app)
    app.include_router(router)
    app.include_router(lora_router)
    app.add_middleware(ServerGuardMiddleware, state=state, api_key=settings.api_key,
                       max_body_bytes=settings.max_request_size)
    # Added last, so outermost: preflights and error responses carry the CORS headers too.
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                       allow_methods=list(settings.allowed_methods), allow_headers=list(settings.allowed_headers),
                       allow_credentials=settings.allow_credentials)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server that marks the app draining as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        """First signal: drain (new requests get 503); a second SIGINT forces the exit."""
        self.state.draining = True
        super().handle_exit(sig, frame)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The server settings of parsed `serve` flags."""
    from graphserve.models.default_model import DEFAULT_MODEL_NAME

    return ServerSettings(
        served_model_names=args.served_model_name or [args.model or DEFAULT_MODEL_NAME],
        api_key=args.api_key or envs.GRAPHSERVE_API_KEY,
        response_role=args.response_role,
        log_requests=not args.disable_log_requests,
        max_n=args.max_n,
        max_request_size=args.max_request_size,
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials,
        log_stats_interval=envs.GRAPHSERVE_LOG_STATS_INTERVAL,
        lora_modules=tuple(args.lora_modules or ()),
    )


def check_lora_modules(config: EngineConfig, settings: ServerSettings) -> None:
    """Fail fast, before the model loads: every --lora-modules adapter must fit the model (ValueError naming it)."""
    if settings.lora_modules:
        mc = config.model_config
        OpenAIServingModels(settings.served_model_names, mc.model, mc.max_model_len,
                            AdapterRegistry(mc, config.lora_config), settings.lora_modules)


def build_server(args: argparse.Namespace) -> tuple[GracefulServer, socket.socket, FastAPI]:
    """Validate the flags, resolve the engine config (fail fast), build the app and bind the port."""
    validate_serve_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    settings = settings_from_args(args)
    check_lora_modules(config, settings)
    app = build_app(config, settings, chat_template=engine_args.chat_template)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    uv_config = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=args.shutdown_timeout,
                               timeout_keep_alive=5)
    server = GracefulServer(uv_config, app.state.server)
    app.state.server.on_load_failure.append(lambda state: setattr(server, "should_exit", True))
    return server, sock, app


def base_url(sock: socket.socket, host: str) -> str:
    """http://HOST:PORT of the bound socket, with a host a local client can use."""
    port = sock.getsockname()[1]
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def usage_banner(url: str, model: str, api_key: bool) -> str:
    """What `graphserve serve` prints once ready: where it serves and a curl to try."""
    auth = ' -H "Authorization: Bearer $GRAPHSERVE_API_KEY"' if api_key else ""
    body = ('{"model": "' + model + '", "messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 32, "temperature": 0}')
    return (
        f"graphserve {__version__} is serving {model} at {url} (OpenAI-compatible API under /v1)\n"
        f"Try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        "Press CTRL+C to stop."
    )


def run_server(args: argparse.Namespace) -> int:
    """`graphserve serve`: serve until SIGTERM/SIGINT; 0 after a graceful stop, 1 if the engine failed to load."""
    server, sock, app = build_server(args)
    state: ServerState = app.state.server
    url = base_url(sock, args.host)
    state.on_ready.append(lambda s: print(usage_banner(url, s.settings.served_model_names[0],
                                                       s.settings.api_key is not None), flush=True))
    logger.info("listening on %s; loading the model", url)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler makes that a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if state.load_error is not None else 0
