"""Benchmark workloads: random token-id prompts of exact lengths, and short varied chat requests."""
from __future__ import annotations

import random

_TOPICS = ["the ocean", "a city at night", "mountains", "the history of bread", "rivers", "a lighthouse",
           "volcanoes", "the moon", "a library", "coffee", "winter", "bicycles", "the desert", "a garden"]
_ASKS = ["Write a short poem about {}.", "Give three facts about {}.", "Describe {} in two sentences.",
         "What is interesting about {}?"]

# A varied text whose tokens (as the server under test tokenizes them) make the serving benchmark's prompts.
VARIED_TEXT = (
    "Continuous batching shares every engine step between many requests, while a paged KV cache keeps keys and "
    "values in fixed-size blocks. The quick brown fox jumps over the lazy dog near the river bank at dawn. "
    "Mountains, oceans, deserts and forests cover the planet; cities glow at night. In 1969 astronauts walked on "
    "the moon. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2). Photosynthesis turns "
    "sunlight, water and carbon dioxide into sugar and oxygen. Bread, cheese, coffee and chocolate travelled the "
    "world along ancient trade routes. Questions, answers, stories, poems, recipes and proofs all become tokens."
)


def random_token_prompts(n: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of exactly `input_len` random token ids, away from the special ids at both ends of the vocab."""
    if vocab_size <= 20:
        raise ValueError(f"vocab_size must exceed 20 for random prompts, got {vocab_size}")
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size - 10) for _ in range(input_len)] for _ in range(n)]


def sampled_token_prompts(n: int, input_len: int, token_ids: list[int], seed: int) -> list[list[int]]:
    """`n` prompts of exactly `input_len` ids drawn from `token_ids` (e.g. a natural text's tokens)."""
    rng = random.Random(seed)
    return [[rng.choice(token_ids) for _ in range(input_len)] for _ in range(n)]


def chat_prompts(n: int, seed: int) -> list[list[dict]]:
    """`n` short, varied single-turn chat requests (a chat workload rather than one repeated prompt)."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(_ASKS).format(rng.choice(_TOPICS))}] for _ in range(n)]
