"""The n-gram proposer against a brute-force definition, and the speculative config's validation."""
from __future__ import annotations

import random

import pytest

from graphserve.spec_decode.config import SpeculativeConfig
from graphserve.spec_decode.ngram_proposer import NgramProposer


def _proposer(k=3, lo=1, hi=3) -> NgramProposer:
    return NgramProposer(SpeculativeConfig("ngram", k, prompt_lookup_min=lo, prompt_lookup_max=hi))


def _brute_force(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # most recent earlier occurrence first
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_longest_and_most_recent_match_wins():
    p = _proposer(k=3, lo=1, hi=3)
    # "1 2 3" occurs twice before the suffix "1 2 3": the later one (followed by 7 8) wins over the earlier (4 5).
    assert p.propose([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 1, 2, 3]) == [7, 8, 0]
    # Only a 1-gram matches.
    assert p.propose([5, 6, 7, 5]) == [6, 7, 5]
    # Nothing matches; too short; a limit from max_tokens.
    assert p.propose([1, 2, 3, 4]) == []
    assert p.propose([1]) == []
    assert p.propose([4, 4, 4, 4], max_tokens=1) == [4]
    assert p.propose([4, 4, 4, 4], max_tokens=0) == []


def test_drafts_stop_at_the_end_of_the_context():
    assert _proposer(k=5).propose([8, 9, 8]) == [9, 8]


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    k, lo = rng.randint(1, 5), rng.randint(1, 3)
    hi = rng.randint(lo, 5)
    tokens = [rng.randrange(4) for _ in range(rng.randint(1, 60))]
    assert _proposer(k, lo, hi).propose(tokens) == _brute_force(tokens, k, lo, hi)


def test_config_from_user_spellings_and_errors():
    config = SpeculativeConfig.from_user('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 5}')
    assert config == SpeculativeConfig("ngram", 4, prompt_lookup_min=1, prompt_lookup_max=5)
    assert SpeculativeConfig.from_user({"model": "/d", "num_speculative_tokens": 2}).method == "draft_model"
    assert SpeculativeConfig.from_user(None) is None
    bad = {
        '{"num_speculative_tokens": 0}': "num_speculative_tokens must be an integer in",
        '{"num_speculative_tokens": 33}': "num_speculative_tokens",
        '{"method": "eagle9", "num_speculative_tokens": 2}': "method must be one of",
        '{"method": "draft_model", "num_speculative_tokens": 2}': "model is required",
        '{"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}': "prompt_lookup_max",
        '{"num_speculative_tokens": 2, "typo": 1}': "unknown fields",
        '{"method": "ngram"}': "num_speculative_tokens is required",
        "[1]": "must be a JSON object",
        "{": "not valid JSON",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.from_user(text)
