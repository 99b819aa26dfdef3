"""The `graphserve` command: `serve` (the OpenAI-compatible server), `generate` (offline, one-shot), `bench`, `env`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from graphserve.benchmarks.cli import add_bench_parser
from graphserve.engine.arg_utils import EngineArgs


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate completions for prompts (chat-templated by default)",
        description="Run the offline engine on one or more prompts and print the replies.",
    )
    p.add_argument("--prompt", "-p", action="append", required=True,
                   help="a prompt (repeat for a batch); sent as a user chat message unless --raw")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    p.add_argument("--system", default=None, help="an optional system message for chat prompts")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """`graphserve generate`: load the model, run the prompts as one batch, print the replies."""
    from graphserve.entrypoints.llm import LLM
    from graphserve.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    params = SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.sample_seed,
    )
    llm = LLM(**vars(engine_args))
    if args.raw:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        conversations = [system + [{"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "outputs": [
                {"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                for c in out.outputs]}))
        else:
            for c in out.outputs:
                print(c.text)
    return 0


def run_env(args: argparse.Namespace) -> int:
    """`graphserve env`: versions, platform, devices and the kernel each op runs with."""
    from graphserve.entrypoints.env_info import collect_env, format_env

    info = collect_env()
    print(json.dumps(info, indent=2) if getattr(args, "json", False) else format_env(info))
    return 0


def _add_serve_parser(subparsers) -> None:
    from graphserve.entrypoints.openai.cli_args import make_arg_parser

    p = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...).",
    )
    make_arg_parser(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """`graphserve serve`: run the OpenAI-compatible server until SIGTERM/SIGINT."""
    from graphserve.entrypoints.openai.api_server import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="graphserve", description="graphserve: LLM inference and serving")
    parser.add_argument("--log-level", default=None,
                        help="python logging level (default: INFO for serve, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_generate_parser(sub)
    add_bench_parser(sub)
    env = sub.add_parser("env", help="print the platform, devices and versions")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=run_env)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # benchmark records name the command that made them
    log_level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except ValueError as e:
        print(f"graphserve: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
