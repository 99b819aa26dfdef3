"""The flags of `graphserve serve`: server flags (vLLM spelling) on top of every engine flag of EngineArgs."""
from __future__ import annotations

import argparse
import json

from graphserve.engine.arg_utils import EngineArgs, parse_memory_size
from graphserve.entrypoints.openai.lora_modules import LoRAModulePath

UVICORN_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return parsed


def _size(value: str) -> int:
    try:
        return parse_memory_size(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 8MiB or a number of bytes, got {value!r}") from None


def _lora_module(value: str) -> LoRAModulePath:
    try:
        return LoRAModulePath.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register `serve`'s positional model, the server flags and the engine flags on `parser`."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory (same as --model); default: the built-in SmolLM2-135M-Instruct")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port, printed at start)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) the API answers to; the first is reported in responses (default: the model)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health, /version and /metrics "
                        "(default: $GRAPHSERVE_API_KEY, unset = no key)")
    g.add_argument("--response-role", default="assistant",
                   help="role of the reply in chat responses when add_generation_prompt is true")
    g.add_argument("--disable-log-requests", action="store_true", help="do not log each request's arrival and end")
    g.add_argument("--uvicorn-log-level", default="info", choices=UVICORN_LOG_LEVELS,
                   help="log level of uvicorn (access log at info)")
    g.add_argument("--allowed-origins", type=_json_list, default=["*"], help='CORS origins, a JSON list (["*"])')
    g.add_argument("--allowed-methods", type=_json_list, default=["*"], help='CORS methods, a JSON list (["*"])')
    g.add_argument("--allowed-headers", type=_json_list, default=["*"], help='CORS headers, a JSON list (["*"])')
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--max-n", type=int, default=16,
                   help="the largest n (and best_of) one request may ask for; larger is a 400")
    g.add_argument("--max-request-size", type=_size, default=8 << 20,
                   help="largest request body, e.g. 8MiB (default); larger is a 413")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT: seconds to let requests in flight finish before aborting them")
    g.add_argument("--lora-modules", type=_lora_module, nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served from the start, each as the model NAME: name=path "
                        'or JSON \'{"name": ..., "path": ..., "base_model_name": ...}\'; needs --enable-lora')
    EngineArgs.add_cli_args(parser)
    return parser


def validate_serve_args(args: argparse.Namespace) -> None:
    """Cross-flag checks argparse cannot express; raises ValueError."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_n < 1:
        raise ValueError(f"--max-n must be at least 1, got {args.max_n}")
    if args.max_request_size < 1024:
        raise ValueError(f"--max-request-size must be at least 1KiB, got {args.max_request_size}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be non-negative, got {args.shutdown_timeout}")
    if args.api_key == "":
        raise ValueError("--api-key must not be empty")
    if args.lora_modules:
        if not args.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        names = [m.name for m in args.lora_modules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"--lora-modules names {duplicates} more than once")
