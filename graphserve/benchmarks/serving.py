"""`graphserve bench serving`: vLLM's benchmark_serving metrics against a running `graphserve serve`.

Random prompts of exactly --input-len tokens (ids drawn from the server's own tokenization of a varied text),
streamed through /v1/completions with exactly --output-len new tokens each (greedy, ignore_eos), arriving as a
Poisson process at --request-rate requests/s (or all at once with inf). Reports request, output and total token
throughput, and TTFT / TPOT / ITL / end-to-end latency mean, median and p99, plus the server's own counters over
the run. Needs httpx and prometheus_client (and, with --launch, the server's fastapi and uvicorn).

    graphserve serve --port 8000 &
    graphserve bench serving --num-prompts 64 --input-len 128 --output-len 64 --request-rate 4 \\
        --out perf/results/cpu/serving_smollm2_rate4.json
    graphserve bench serving --launch "--max-num-seqs 64" --request-rate inf ...   # start and stop a server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """What one streamed request measured."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    output_tokens: int = 0
    prompt_tokens: int = 0


async def _one_request(client, model: str, prompt: list[int], output_len: int) -> RequestResult:
    """Stream one completion and time its first chunk, the gaps between chunks and its end."""
    result = RequestResult()
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except Exception as e:  # noqa: BLE001 (a failed request is counted, not fatal)
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _run(args: argparse.Namespace, base_url: str) -> dict:
    """Warm up, then send every request on its Poisson schedule and gather what each measured."""

    import httpx

    from graphserve.benchmarks.datasets import VARIED_TEXT, sampled_token_prompts

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.num_prompts + 8, max_keepalive_connections=args.num_prompts + 8)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=3600) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        tokenized = await client.post("/tokenize", json={"prompt": VARIED_TEXT, "add_special_tokens": False})
        vocab = sorted(set(tokenized.json()["tokens"]))
        prompts = sampled_token_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        warm_up = sampled_token_prompts(1, 16, vocab, args.seed + 1)[0]  # not a prefix of any measured prompt
        await _one_request(client, model, warm_up, 2)
        arrivals = random.Random(args.seed)
        before = (await client.get("/metrics")).text
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one_request(client, model, prompt, args.output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        after = (await client.get("/metrics")).text
    return _summarize(args, model, results, duration, _metrics_delta(before, after))


def _metrics_delta(before: str, after: str) -> dict:
    """Increase of the server's counters over the run (a cross-check of the client's view)."""
    from prometheus_client.parser import text_string_to_metric_families

    def totals(text: str) -> dict:
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_total") and "finished_reason" not in s.labels:
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    b, a = totals(before), totals(after)
    return {name.removeprefix("graphserve:"): a[name] - b.get(name, 0.0) for name in sorted(a)}


def _stats_ms(values: list[float]) -> dict:
    """Mean, median and p99 of `values` (seconds) in milliseconds; None for each when there are none."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": round(1000 * statistics.fmean(values), 2), "median": round(1000 * statistics.median(values), 2),
            "p99": round(1000 * p99, 2)}


def _summarize(args: argparse.Namespace, model: str, results: list[RequestResult], duration: float,
               server: dict) -> dict:
    """The run's numbers in vLLM's benchmark_serving vocabulary."""
    ok = [r for r in results if r.ok]
    num_in = sum(r.prompt_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "model": model, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "request_rate": args.request_rate, "seed": args.seed,
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors[:5],
        "duration_s": round(duration, 3), "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": round(len(ok) / duration, 3),
        "output_token_throughput": round(num_out / duration, 2),
        "total_token_throughput": round((num_in + num_out) / duration, 2),
        "ttft_ms": _stats_ms([r.ttft for r in ok]), "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itl]), "e2el_ms": _stats_ms([r.latency for r in ok]),
        "server_counters": server,
    }


def _print_table(r: dict) -> None:
    """vLLM-style result table on stderr (stdout carries the JSON record)."""
    rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
            ("Benchmark duration (s)", r["duration_s"]), ("Total input tokens", r["total_input_tokens"]),
            ("Total generated tokens", r["total_output_tokens"]),
            ("Request throughput (req/s)", r["request_throughput"]),
            ("Output token throughput (tok/s)", r["output_token_throughput"]),
            ("Total token throughput (tok/s)", r["total_token_throughput"])]
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        rows += [(f"{stat.capitalize()} {title} (ms)", r[key][stat]) for stat in ("mean", "median", "p99")]
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20, file=sys.stderr)
    for name, value in rows:
        print(f"{name:<40}{value:>20}", file=sys.stderr)


def launch_argv(serve_args: str) -> list[str]:
    """`serve` flags for --launch: dummy weights without a tokenizer get the benchmark tokenizer, as offline."""
    argv = shlex.split(serve_args)
    pairs = zip(argv, argv[1:] + [""])
    dummy = any(a == "--load-format=dummy" or (a, b) == ("--load-format", "dummy") for a, b in pairs)
    if dummy and not any(a == "--tokenizer" or a.startswith("--tokenizer=") for a in argv):
        from graphserve.benchmarks.tokenizer import benchmark_tokenizer_dir

        argv += ["--tokenizer", benchmark_tokenizer_dir()]
    return argv


def _launch(serve_args: str, host: str) -> tuple[subprocess.Popen, str]:
    """Start `graphserve serve` on a free port and wait until /health answers 200."""
    import httpx

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "graphserve", "serve", *launch_argv(serve_args), "--host", host, "--port",
           str(port), "--disable-log-requests", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the serving benchmark's flags on `parser` (it talks to a server, so no engine flags)."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server (ignored with --launch)")
    parser.add_argument("--launch", default=None, metavar="SERVE_ARGS",
                        help='start `graphserve serve SERVE_ARGS` on a free port for the run, e.g. ""')
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("GRAPHSERVE_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s of the Poisson arrivals; inf = all at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    parser.add_argument("--out", default=None, help="write the JSON record to this file")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the load against the server (launching it first with --launch) and write the record."""
    from graphserve.benchmarks.common import write_record

    proc = None
    base_url = args.base_url
    if args.launch is not None:
        proc, base_url = _launch(args.launch, "127.0.0.1")
    try:
        results = asyncio.run(_run(args, base_url))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    if args.launch is not None:
        results["server_command"] = f"graphserve serve {args.launch}".strip()
    _print_table(results)
    write_record("serving", results, args.out, getattr(args, "argv", None))
    return 0
