"""Speculative decoding benchmarks (n-gram prompt lookup), batch 1.

Default mode: input-grounded chat requests (rewrite / extract / edit a given passage, the model's chat template)
run one at a time, greedy, first without speculation and then with n-gram drafts for each k of `--k`. Reported per
run: decode tokens/s (output tokens after the first over the time after the first token), the speedup over plain
decoding, the draft acceptance rate, the mean accepted length (tokens emitted per verify step) and whether every
output is token-identical to plain decoding.

`--verify-cost`: the mechanism's cost, independent of acceptance (for dummy weights): every step of a batch-1
decode verifies exactly k forced drafts (k = 0 is a plain decode step), one engine per k (its verify graphs have
1 + k rows per request); reported as ms per step. With `--draft-model` the drafts come from that model (dummy
weights: mostly rejected, but every step still verifies k), so the step includes the draft's proposal.

`--synthetic`: token-id prompts that repeat random spans (copy-heavy), greedy, at each `--batch-sizes` B: plain
decoding, then n-gram for each k (with `--speculative-disable-by-batch-size` as given): output tokens/s of the
decode phase, speedup, acceptance. With dummy weights the continuation is whatever the random model produces
(random models fall into loops, which prompt lookup also finds); the record says so.

    python -m perf.bench_spec_decode --out perf/results/cpu/spec_decode_ngram_smollm2.json
    python -m perf.bench_spec_decode --verify-cost --model perf/configs/llama-3-8b --load-format dummy \\
        --dtype bfloat16 --out perf/results/h200/spec_decode_verify_cost_llama8b.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from graphserve.benchmarks.common import write_record
from graphserve.engine.arg_utils import EngineArgs

PASSAGE = (
    "The Rhine is a river that begins in the Swiss Alps and flows through Switzerland, Liechtenstein, Austria, "
    "Germany, France and the Netherlands before it empties into the North Sea. It is about 1,230 kilometres long. "
    "Cities on the Rhine include Basel, Strasbourg, Mannheim, Cologne, Dusseldorf and Rotterdam. For centuries the "
    "river has been an important trade route, and many castles were built along its banks in the Middle Ages."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    total = 0\n"
    "    for item in items:\n"
    "        total = total + item.price * item.quantity\n"
    "    total = total + total * tax_rate\n"
    "    return total\n"
)
TASKS = [
    f"Rewrite the following text exactly, but in the present tense where possible:\n\n{PASSAGE}",
    f"List every city named in this passage, one per line, copying the names exactly:\n\n{PASSAGE}",
    f"Copy this Python function, renaming the variable `total` to `amount`. Output only the code.\n\n{CODE}",
    f"Repeat the following passage word for word, then add one sentence about Rotterdam:\n\n{PASSAGE}",
    f"Add a docstring to this function and return the whole function:\n\n{CODE}",
    f"Summarise this passage in two sentences, reusing its wording:\n\n{PASSAGE}",
]
# `--tasks code-chat` (draft models, which need no input grounding): code generation, a code edit, a chat answer.
CODE_CHAT_TASKS = [
    "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a docstring and two "
    "doctest examples.",
    "Write a Python function that performs binary search on a sorted list and returns the index or -1.",
    f"Add type hints and a docstring to this function and return the whole function:\n\n{CODE}",
    "Explain in three sentences what a hash table is and when to use one.",
]
TASK_SETS = {"grounded": TASKS, "code-chat": CODE_CHAT_TASKS}


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 5], help="num_speculative_tokens values")
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--tasks", choices=sorted(TASK_SETS), default="grounded",
                        help="the chat tasks of the default mode")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per reply")
    parser.add_argument("--verify-cost", action="store_true", help="time forced verify steps instead")
    parser.add_argument("--draft-model", default=None,
                        help="drafts from this draft model instead of n-gram (verify-cost: e.g. a 1-layer model of "
                             "the target's shape)")
    parser.add_argument("--synthetic", action="store_true", help="copy-heavy token-id prompts at --batch-sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="synthetic: batch sizes")
    parser.add_argument("--prompt-len", type=int, default=256, help="synthetic: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="verify-cost: decode steps timed per k")
    parser.add_argument("--profile", default=None,
                        help="verify-cost: write a torch.profiler table of one run at the largest k to this file")
    parser.add_argument("--out", default=None)
    EngineArgs.add_cli_args(parser)
    return parser


def _engine_kwargs(args: argparse.Namespace) -> dict:
    from graphserve.benchmarks.tokenizer import bench_engine_args

    engine_args = bench_engine_args(args)  # dummy weights get the benchmark tokenizer
    defaults = EngineArgs()
    kwargs = {k: v for k, v in vars(engine_args).items()
              if k not in ("model", "speculative_config") and v != getattr(defaults, k)}
    # The one-token run before each request would otherwise cache its prompt and shorten the timed prefill.
    kwargs["enable_prefix_caching"] = False
    return kwargs


def _spec_counts(llm) -> tuple[int, int, int]:
    s = llm.llm_engine.engine_core.scheduler
    return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def _run_tasks(llm, params, tasks: list[str]) -> tuple[list[list[int]], float, int]:
    """Each task alone (batch 1): its token ids, total decode seconds after the first token (the time of the same
    request stopped after one token subtracted), decode tokens."""
    from graphserve import SamplingParams

    first_only = SamplingParams(temperature=0.0, max_tokens=1)
    tokens, decode_s, decode_tokens = [], 0.0, 0
    for task in tasks:
        messages = [{"role": "user", "content": task}]
        t0 = time.perf_counter()
        llm.chat(messages, first_only, use_tqdm=False)
        t1 = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0]
        t2 = time.perf_counter()
        ids = out.outputs[0].token_ids
        tokens.append(list(ids))
        decode_s += (t2 - t1) - (t1 - t0)
        decode_tokens += len(ids) - 1
    return tokens, decode_s, decode_tokens


def bench_ngram(args: argparse.Namespace) -> dict:
    """Plain decoding, then each k of n-gram drafts (or of `--draft-model` drafts), over the chat tasks."""
    from graphserve import LLM, SamplingParams

    tasks = TASK_SETS[args.tasks]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    warm = SamplingParams(temperature=0.0, max_tokens=8)
    kwargs = _engine_kwargs(args)
    llm = LLM(args.model, **kwargs)
    _run_tasks(llm, warm, tasks[:1])
    ref_tokens, ref_s, ref_n = _run_tasks(llm, params, tasks)
    plain = {"decode_tok_s": ref_n / ref_s, "decode_tokens": ref_n}
    print(json.dumps({"k": 0, **plain}), flush=True)
    del llm
    runs = []
    for k in args.k:
        if args.draft_model:
            spec = {"model": args.draft_model, "num_speculative_tokens": k}
        else:
            spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.prompt_lookup_max}
        llm = LLM(args.model, speculative_config=spec, **kwargs)
        _run_tasks(llm, warm, tasks[:1])
        before = _spec_counts(llm)
        tokens, s, n = _run_tasks(llm, params, tasks)
        drafts, draft_tokens, accepted = (a - b for a, b in zip(_spec_counts(llm), before))
        runs.append({
            "num_speculative_tokens": k, "decode_tok_s": n / s, "speedup": (n / s) / plain["decode_tok_s"],
            "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0,
            "verify_steps": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
            "identical_to_plain": tokens == ref_tokens,
        })
        print(json.dumps(runs[-1]), flush=True)
        del llm
    proposer = (f"draft model {args.draft_model}" if args.draft_model
                else f"ngram (prompt_lookup_max {args.prompt_lookup_max})")
    return {"workload": f"{args.tasks} chat tasks, one at a time, greedy", "num_tasks": len(tasks),
            "proposer": proposer, "max_tokens": args.max_tokens, "plain": plain,
            "draft_model" if args.draft_model else "ngram": runs}


def _timed(llm, platform, prompt, params) -> float:
    platform.synchronize(platform.device())
    t0 = time.perf_counter()
    llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)
    platform.synchronize(platform.device())
    return time.perf_counter() - t0


def _profile(llm, prompt, params, path: str) -> None:
    """Host and device time per op of one batch-1 run (the last k set), by self time on each side."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)
    averages = prof.key_averages()
    with open(path, "w") as f:
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        if torch.cuda.is_available():
            f.write(averages.table(sort_by="self_cuda_time_total", row_limit=30) + "\n")


def _counting_steps(llm) -> dict[str, int]:
    """Count the engine core's steps (the prefill is one step at batch 1)."""
    core = llm.llm_engine.engine_core
    counter = {"steps": 0}
    original_step = core.step

    def counted_step():
        counter["steps"] += 1
        return original_step()

    core.step = counted_step
    return counter


def bench_verify_cost(args: argparse.Namespace) -> dict:
    from graphserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    first_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompt = [[11 + i for i in range(32)]]
    results = []
    for k in [0, *args.k]:
        # k = 0: plain decode steps (no speculation); k > 0: forced n-gram drafts, or the draft model's own.
        if k == 0:
            spec = None
        elif args.draft_model:
            spec = {"model": args.draft_model, "num_speculative_tokens": k}
        else:
            spec = {"method": "ngram", "num_speculative_tokens": k}
        llm = LLM(args.model, speculative_config=spec, **_engine_kwargs(args))
        runner = llm.llm_engine.engine_core.model_executor.model_runner
        platform = runner.platform
        if spec is not None and not args.draft_model:
            runner.proposer.proposer.propose = lambda ids, max_tokens=None, k=k: [ids[-1]] * k
        counter = _counting_steps(llm)
        llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)  # warm-up
        best = None
        for _ in range(3):
            first_s = _timed(llm, platform, prompt, first_only)  # the prefill step alone, subtracted
            counter["steps"] = 0
            elapsed = _timed(llm, platform, prompt, params)
            steps = counter["steps"]
            ms = 1e3 * (elapsed - first_s) / max(1, steps - 1)
            best = ms if best is None else min(best, ms)
        graphs = runner.graph_runner
        results.append({"k": k, "ms_per_step": best, "steps": steps,
                        "verify_graphs": 0 if graphs is None or graphs.verify_buckets is None
                        else len(graphs.verify_buckets.sizes)})
        print(json.dumps(results[-1]), flush=True)
        if args.profile and k == max(args.k):
            _profile(llm, prompt, params, args.profile)
        del llm
    base = results[0]["ms_per_step"]
    for r in results:
        r["relative_to_plain_step"] = r["ms_per_step"] / base
    workload = ("batch 1, every step verifies k drafts of the draft model (proposal cost included)"
                if args.draft_model else "batch 1, forced n-gram drafts (every step verifies k drafts)")
    return {"workload": workload, "draft_model": args.draft_model, "output_len": args.output_len,
            "results": results}


def _copy_heavy_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts made of a few random spans of 8..32 tokens, each repeated (prompt lookup finds drafts in them)."""
    import random

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        ids: list[int] = []
        spans = [[rng.randrange(100, vocab) for _ in range(rng.randrange(8, 33))] for _ in range(4)]
        while len(ids) < length:
            ids.extend(rng.choice(spans))
        prompts.append(ids[:length])
    return prompts


def _timed_batch(llm, platform, prompts, params, first_only) -> tuple[float, int, list]:
    """Decode seconds of the batch (wall time minus the same batch stopped after one token) and decode tokens."""
    first_s = _timed(llm, platform, prompts, first_only)
    platform.synchronize(platform.device())
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    platform.synchronize(platform.device())
    elapsed = time.perf_counter() - t0
    return elapsed - first_s, sum(len(o.outputs[0].token_ids) - 1 for o in outs), [o.outputs[0].token_ids
                                                                                   for o in outs]


def bench_synthetic(args: argparse.Namespace) -> dict:
    from graphserve import LLM, SamplingParams

    kwargs = _engine_kwargs(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    first_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    disable = kwargs.pop("speculative_disable_by_batch_size", None)
    llm = LLM(args.model, **kwargs)
    vocab = llm.llm_engine.config.model_config.vocab_size
    platform = llm.llm_engine.engine_core.model_executor.model_runner.platform
    prompts = {b: _copy_heavy_prompts(b, args.prompt_len, vocab, seed=b) for b in args.batch_sizes}
    plain = {}
    for b in args.batch_sizes:
        llm.generate(prompt_token_ids=prompts[b][:1], sampling_params=first_only, use_tqdm=False)  # warm-up
        s, n, tokens = _timed_batch(llm, platform, prompts[b], params, first_only)
        plain[b] = {"decode_tok_s": n / s, "tokens": tokens}
        print(json.dumps({"batch_size": b, "k": 0, "decode_tok_s": n / s}), flush=True)
    del llm
    runs = []
    for k in args.k:
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.prompt_lookup_max,
                "disable_by_batch_size": disable}
        llm = LLM(args.model, speculative_config=spec, **kwargs)
        for b in args.batch_sizes:
            llm.generate(prompt_token_ids=prompts[b][:1], sampling_params=first_only, use_tqdm=False)
            before = _spec_counts(llm)
            s, n, tokens = _timed_batch(llm, platform, prompts[b], params, first_only)
            drafts, draft_tokens, accepted = (a - c for a, c in zip(_spec_counts(llm), before))
            runs.append({
                "batch_size": b, "num_speculative_tokens": k, "decode_tok_s": n / s,
                "speedup": (n / s) / plain[b]["decode_tok_s"],
                "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
                "mean_accepted_length": 1 + accepted / drafts if drafts else 1.0, "verify_steps": drafts,
                "identical_to_plain": tokens == plain[b]["tokens"],
            })
            print(json.dumps(runs[-1]), flush=True)
        del llm
    return {"workload": f"copy-heavy token-id prompts of {args.prompt_len} tokens (random spans repeated), greedy, "
                        f"{args.max_tokens} new tokens; dummy weights make the continuation the random model's own",
            "disable_by_batch_size": disable,
            "plain": {b: {"decode_tok_s": v["decode_tok_s"]} for b, v in plain.items()}, "ngram": runs}


def main(args: argparse.Namespace) -> int:
    if args.verify_cost:
        record, name = bench_verify_cost(args), "spec_decode_verify_cost"
    elif args.synthetic:
        record, name = bench_synthetic(args), "spec_decode_synthetic"
    else:
        record = bench_ngram(args)
        name = "spec_decode_draft_model" if args.draft_model else "spec_decode_ngram"
    record["model"] = args.model or "default (SmolLM2-135M-Instruct GGUF)"
    write_record(name, record, args.out, sys.argv)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.exit(main(add_cli_args(parser).parse_args()))
