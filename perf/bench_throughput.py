"""Offline throughput: N prompts through `LLM` at once, each decoding exactly its output length.

    python perf/bench_throughput.py --num-prompts 64 --output-len 64 --chat \
        --out perf/results/cpu/throughput_smollm2.json          # the default model, chat prompts
    python perf/bench_throughput.py --model DIR --load-format dummy --input-len 256 --output-len 256
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.common import write_record  # noqa: E402

_TOPICS = ["the ocean", "a city at night", "mountains", "the history of bread", "rivers", "a lighthouse",
           "volcanoes", "the moon", "a library", "coffee", "winter", "bicycles", "the desert", "a garden"]


def chat_prompts(n: int, seed: int) -> list[list[dict]]:
    """Short, varied chat requests (like a chat workload, not a fixed prompt)."""
    rng = random.Random(seed)
    asks = ["Write a short poem about {}.", "Give three facts about {}.", "Describe {} in two sentences.",
            "What is interesting about {}?"]
    return [[{"role": "user", "content": rng.choice(asks).format(rng.choice(_TOPICS))}] for _ in range(n)]


def random_token_prompts(n: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token-id prompts of an exact length (the ISL/OSL grid workload)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(input_len)] for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="random-token prompts (ignored with --chat)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="chat-templated natural-language prompts")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the random workload")
    parser.add_argument("--out", default=None)
    from graphserve.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()

    from graphserve import LLM, SamplingParams

    from perf.dummy_model import bench_engine_args

    engine_args = bench_engine_args(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args))
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    tok = llm.get_tokenizer()
    if args.chat:
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in chat_prompts(args.num_prompts, args.prompt_seed)]
        prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    else:
        prompts = random_token_prompts(args.num_prompts, args.input_len, llm.llm_engine.model_config.vocab_size,
                                       args.prompt_seed)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_out == args.output_len * args.num_prompts
    results = {
        "model": engine_args.model or "SmolLM2-135M-Instruct (default, GGUF Q4_1 dequantized)",
        "dtype": llm.llm_engine.model_config.dtype,
        "num_prompts": args.num_prompts,
        "input_tokens": num_in,
        "output_tokens": num_out,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(num_out / elapsed, 2),
        "total_tokens_per_s": round((num_in + num_out) / elapsed, 2),
        "load_s": round(load_s, 2),
    }
    write_record("offline_throughput", results, args.out)


if __name__ == "__main__":
    main()
