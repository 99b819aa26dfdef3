"""`graphserve bench throughput`: offline throughput, every request decoding exactly its output length.

`--num-prompts` random-token prompts of `--input-len` tokens go to `LLM.generate` at once, greedy with
`ignore_eos`; reported: requests/s, output tokens/s and total (prompt + output) tokens/s. `--grid` runs several
input/output points (default: 128/128, 256/256, 1000/1000, 2048/128, 128/2048) after one engine load and writes
one record. `--backend transformers` measures transformers' continuous batching (`generate_batch`) on the same
prompts with a random-weight model of the same config; `--backend both` runs both and records the
graphserve / transformers ratio per point (transformers runs first, then frees the GPU for graphserve).

    graphserve bench throughput --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 --grid
    graphserve bench throughput --model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16 \\
        --backend both --input-len 256 --output-len 256 --num-prompts 256
    graphserve bench throughput --num-prompts 64 --output-len 64 --chat      # the default model, chat prompts
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from graphserve.engine.arg_utils import EngineArgs

DEFAULT_GRID = ((128, 128), (256, 256), (1000, 1000), (2048, 128), (128, 2048))


def _grid_point(text: str) -> tuple[int, int]:
    try:
        input_len, output_len = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a grid point is INPUTxOUTPUT, e.g. 256x256; got {text!r}") from None
    if input_len < 1 or output_len < 1:
        raise argparse.ArgumentTypeError(f"grid lengths must be positive, got {text!r}")
    return input_len, output_len


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from graphserve.benchmarks.lora_adapters import add_lora_bench_args

    """Register the throughput benchmark's flags and the engine flags on `parser`."""
    parser.add_argument("--backend", choices=["graphserve", "transformers", "both"], default="graphserve",
                        help="what runs the workload; both = graphserve and transformers on the same prompts")
    parser.add_argument("--num-prompts", type=int, default=1000, help="requests per point")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (ignored with --chat or --grid)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--grid", type=_grid_point, nargs="*", default=None, metavar="INxOUT",
                        help="run several points in one process; no value = 128x128 256x256 1000x1000 2048x128 "
                             "128x2048")
    parser.add_argument("--chat", action="store_true", help="chat-templated natural-language prompts (graphserve)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the random workload")
    parser.add_argument("--transformers-attn-implementation", default=None,
                        help="attn_implementation of the transformers model (default: transformers' choice)")
    parser.add_argument("--transformers-num-blocks", type=int, default=None,
                        help="KV blocks of transformers' continuous batching (default: sized from free memory)")
    parser.add_argument("--transformers-max-batch-tokens", type=int, default=None,
                        help="token budget per step of transformers' continuous batching (default: its own)")
    parser.add_argument("--out", default=None, help="write the JSON record to this file")
    add_lora_bench_args(parser)
    EngineArgs.add_cli_args(parser)
    return parser


def _points(args: argparse.Namespace) -> list[tuple[int | None, int]]:
    if args.chat:
        if args.grid is not None:
            raise ValueError("--chat and --grid exclude each other: chat prompts have their own lengths")
        return [(None, args.output_len)]
    if args.grid is None:
        return [(args.input_len, args.output_len)]
    return list(args.grid) or list(DEFAULT_GRID)


def _workload(args: argparse.Namespace, index: int, input_len: int | None, vocab_size: int,
              tokenizer: Any = None) -> list[list[int]]:
    """The prompts of one point: random token ids (seeded per point), or tokenized chat prompts."""
    from graphserve.benchmarks.datasets import chat_prompts, random_token_prompts

    if input_len is not None:
        return random_token_prompts(args.num_prompts, input_len, vocab_size, args.prompt_seed + index)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
             for c in chat_prompts(args.num_prompts, args.prompt_seed)]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def run_graphserve(llm: Any, prompts: list[list[int]], output_len: int, loras: list | None = None) -> dict:
    """Throughput of one workload through `LLM.generate` (greedy, ignore_eos), spread over `loras` if given."""
    from graphserve import SamplingParams
    from graphserve.benchmarks.lora_adapters import spread
    from graphserve.benchmarks.roofline import sig

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                           lora_request=spread(loras or [], len(prompts)))
    elapsed = time.perf_counter() - t0
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    if num_out != output_len * len(prompts):
        raise RuntimeError(f"ignore_eos requests produced {num_out} tokens, expected {output_len * len(prompts)}")
    return {"num_prompts": len(prompts), "input_tokens": num_in, "output_tokens": num_out,
            "elapsed_s": sig(elapsed), "requests_per_s": round(len(prompts) / elapsed, 3),
            "output_tokens_per_s": round(num_out / elapsed, 2),
            "total_tokens_per_s": round((num_in + num_out) / elapsed, 2)}


def _run_transformers(args: argparse.Namespace, mc: Any, points: list, prompts: list) -> tuple[list, dict]:
    """Every point through transformers' generate_batch; the model is freed before returning."""
    from graphserve.benchmarks.transformers_backend import TransformersRunner

    runner = TransformersRunner(mc.hf_config, mc.dtype, args.device, args.transformers_attn_implementation,
                                args.transformers_num_blocks, args.transformers_max_batch_tokens)
    try:
        runner.generate(_warm_up_prompts(args, mc.vocab_size), 2)  # device context, kernels, allocator
        rows = []
        for (_, output_len), workload in zip(points, prompts):
            rows.append(runner.run(workload, output_len))
            _print_point("transformers", rows[-1])
        return rows, runner.describe()
    finally:
        runner.close()


def _warm_up_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    """Two short prompts unlike any point's (so they never make a prefix-cache hit)."""
    from graphserve.benchmarks.datasets import random_token_prompts

    return random_token_prompts(2, 16, vocab_size, seed=args.prompt_seed + 10_000)


def _model_config(engine_args: Any):
    """The ModelConfig graphserve would serve (config.json, dtype resolved), without loading the engine."""
    from graphserve.models.config_loader import create_model_config

    return create_model_config(engine_args.model, dtype=engine_args.dtype, max_model_len=engine_args.max_model_len,
                               load_format=engine_args.load_format, seed=engine_args.seed,
                               tokenizer=engine_args.tokenizer)


def _print_point(backend: str, row: dict) -> None:
    print(f"[{backend}] {row['num_prompts']} requests, {row['input_tokens']} prompt + {row['output_tokens']} "
          f"output tokens in {row['elapsed_s']:.2f} s: {row['requests_per_s']:.2f} requests/s, "
          f"{row['output_tokens_per_s']:.1f} output tok/s, {row['total_tokens_per_s']:.1f} total tok/s",
          file=sys.stderr)


def _run_graphserve_points(args: argparse.Namespace, engine_args: Any, points: list,
                           prompts: list) -> tuple[list, float, str]:
    """Load the engine once and run every point; returns (rows, load seconds, dtype). Makes the prompts if none."""
    from graphserve import LLM, SamplingParams
    from graphserve.benchmarks.lora_adapters import bench_lora_requests, spread

    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    load_s = time.perf_counter() - t0
    mc = llm.llm_engine.model_config
    if not prompts:
        prompts = [_workload(args, i, n, mc.vocab_size, llm.get_tokenizer()) for i, (n, _) in enumerate(points)]
    loras = bench_lora_requests(args, llm)
    warm_up = _warm_up_prompts(args, mc.vocab_size)
    llm.generate(prompt_token_ids=warm_up, sampling_params=SamplingParams(max_tokens=2), use_tqdm=False,
                 lora_request=spread(loras, len(warm_up)))
    rows = []
    for (_, output_len), workload in zip(points, prompts):
        rows.append(run_graphserve(llm, workload, output_len, loras))
        _print_point("graphserve", rows[-1])
    return rows, load_s, mc.dtype


def _merge(points: list, num_prompts: int, gs_rows: list | None, hf_rows: list | None) -> list[dict]:
    """One row per point with each backend's numbers and, when both ran, graphserve / transformers output tok/s."""
    from graphserve.benchmarks.roofline import sig

    rows = []
    for i, (input_len, output_len) in enumerate(points):
        row: dict[str, Any] = {"input_len": input_len, "output_len": output_len, "num_prompts": num_prompts}
        if gs_rows:
            row["graphserve"] = gs_rows[i]
        if hf_rows:
            row["transformers"] = hf_rows[i]
        if gs_rows and hf_rows:
            row["ratio_output_tokens_per_s"] = sig(
                gs_rows[i]["output_tokens_per_s"] / hf_rows[i]["output_tokens_per_s"])
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    """Run every point on the chosen backend(s) and write one record."""
    from graphserve.benchmarks.common import write_record
    from graphserve.benchmarks.tokenizer import bench_engine_args

    points = _points(args)
    if args.chat and args.backend != "graphserve":
        raise ValueError("--chat runs on the graphserve backend only")
    engine_args = bench_engine_args(args)
    prompts: list = []
    hf_rows, hf_info = None, None
    if args.backend != "graphserve":
        mc = _model_config(engine_args)
        prompts = [_workload(args, i, n, mc.vocab_size) for i, (n, _) in enumerate(points)]
        hf_rows, hf_info = _run_transformers(args, mc, points, prompts)  # first: it frees the GPU afterwards
    gs_rows, load_s, dtype = None, None, None
    if args.backend != "transformers":
        gs_rows, load_s, dtype = _run_graphserve_points(args, engine_args, points, prompts)
    results = {
        "backend": args.backend, "model": engine_args.model or "SmolLM2-135M-Instruct (default model)",
        "dtype": dtype or (hf_info or {}).get("dtype"), "load_s": round(load_s, 2) if load_s is not None else None,
        "transformers": hf_info, "points": _merge(points, args.num_prompts, gs_rows, hf_rows),
        "lora": ({"num_adapters": args.num_lora_adapters, "rank": args.lora_rank} if args.num_lora_adapters
                 else None),
        "engine_args": {k: v for k, v in vars(engine_args).items() if v is not None},
    }
    write_record("offline_throughput", results, args.out, getattr(args, "argv", None))
    return 0
