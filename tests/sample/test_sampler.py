"""Sampler: each SamplingParams field changes the sampled tokens / processed logits exactly as specified."""
import math

import pytest
import torch

from graphserve.ops.sampling import apply_top_k_top_p
from graphserve.sample import Sampler, SamplerOutput, compute_topk_logprobs
from graphserve.sample.metadata import SamplingRequestState, build_sampling_metadata
from graphserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
sampler = Sampler()


def _states(params, prompts=None, outputs=None):
    prompts = prompts or [[0]] * len(params)
    outputs = outputs or [[] for _ in params]
    return [SamplingRequestState(f"r{i}", p, list(pr), list(o)) for i, (p, pr, o) in
            enumerate(zip(params, prompts, outputs))]


def _sample(logits, params, prompts=None, outputs=None, generator=None) -> SamplerOutput:
    meta = build_sampling_metadata(_states(params, prompts, outputs), logits.shape[1], logits.device, generator)
    return sampler(logits, meta)


def _processed(logits, params, prompts=None, outputs=None):
    meta = build_sampling_metadata(_states(params, prompts, outputs), logits.shape[1], logits.device)
    return Sampler.process_logits(logits, meta)


def _counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens.cpu(), minlength=vocab_size)


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_zero_is_argmax_and_input_untouched(device):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)).to(device)
    before = logits.clone()
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64 and out.topk_token_ids is None
    out = _sample(logits, [SamplingParams(temperature=0.0, presence_penalty=1.0, logit_bias={1: 5.0})] * 6,
                  outputs=[[3]] * 6)
    assert torch.equal(logits, before)


def test_top_k_one_equals_greedy():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    out = _sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_k_samples_only_the_k_largest():
    row = torch.tensor([0.0, 3.0, 1.0, 2.9, 2.8, -1.0])
    out = _sample(row.repeat(2000, 1), [SamplingParams(top_k=3)] * 2000, generator=torch.Generator().manual_seed(3))
    assert set(out.sampled_token_ids.tolist()) == {1, 3, 4}


def test_top_p_nucleus():
    probs = torch.tensor([0.2, 0.5, 0.3])
    row = probs.log()
    gen = torch.Generator().manual_seed(4)
    only_top = _sample(row.repeat(500, 1), [SamplingParams(top_p=0.05)] * 500, generator=gen)
    assert set(only_top.sampled_token_ids.tolist()) == {1}
    # 0.5 < 0.75 <= 0.5 + 0.3: the nucleus is {1, 2}.
    nucleus = _sample(row.repeat(2000, 1), [SamplingParams(top_p=0.75)] * 2000, generator=gen)
    assert set(nucleus.sampled_token_ids.tolist()) == {1, 2}


def test_top_k_top_p_mask_directly():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.5]))
    inf = float("-inf")
    assert torch.equal(masked[0], torch.tensor([inf, 4.0, 3.0, inf]))
    # Row 1: softmax top prob is ~0.64 >= 0.5, so only the top token survives.
    assert torch.equal(masked[1], torch.tensor([inf, 4.0, inf, inf]))


def test_min_p_relative_to_top_probability():
    row = torch.tensor([0.6, 0.3, 0.1]).log()
    gen = torch.Generator().manual_seed(5)
    # Threshold 0.2 * 0.6 = 0.12 removes token 2 only.
    out = _sample(row.repeat(2000, 1), [SamplingParams(min_p=0.2)] * 2000, generator=gen)
    assert set(out.sampled_token_ids.tolist()) == {0, 1}
    out = _sample(row.repeat(2000, 1), [SamplingParams(min_p=0.0)] * 2000, generator=gen)
    assert set(out.sampled_token_ids.tolist()) == {0, 1, 2}


def test_distribution_matches_probs_and_temperature():
    probs = torch.tensor([0.2, 0.3, 0.5])
    n = 20000
    gen = torch.Generator().manual_seed(6)
    for temperature in (1.0, 2.0):
        expected = probs ** (1.0 / temperature)
        expected = expected / expected.sum() * n
        out = _sample(probs.log().repeat(n, 1), [SamplingParams(temperature=temperature)] * n, generator=gen)
        observed = _counts(out.sampled_token_ids, 3).double()
        chi2 = ((observed - expected) ** 2 / expected).sum().item()
        assert chi2 < 13.8, (temperature, observed, expected)  # p = 0.001 for 2 degrees of freedom
    # The bound is tight enough to see a wrong temperature: T=2 samples are far from the T=1 distribution.
    observed = _counts(out.sampled_token_ids, 3).double()
    assert (((observed - probs * n) ** 2) / (probs * n)).sum().item() > 100


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0, 1.0]])
    got = _processed(logits, [SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]], outputs=[[3, 3]])
    # Seen tokens (prompt 0, 1 and output 3): positive divided, negative multiplied; others untouched.
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 2.0, -4.0, 2.0, 1.0]]))


def test_presence_and_frequency_penalties_openai_semantics():
    logits = torch.zeros(2, 5)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(presence_penalty=-1.0)]
    got = _processed(logits, params, prompts=[[4, 4], [4]], outputs=[[1, 1, 1, 2], [0]])
    # Output tokens only (prompt token 4 untouched): logit -= frequency * count + presence * (count > 0).
    assert torch.allclose(got[0], torch.tensor([0.0, -1.25, -0.75, 0.0, 0.0]))
    assert torch.allclose(got[1], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))


def test_penalties_only_touch_their_rows():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(7))
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0), SamplingParams()]
    got = _processed(logits, params, prompts=[[1, 2]] * 3, outputs=[[3, 4]] * 3)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert not torch.equal(got[1], logits[1])


def test_logit_bias():
    logits = torch.zeros(2, 8)
    logits[:, 0] = 5.0
    params = [SamplingParams(temperature=0.0, logit_bias={6: 10.0, 0: -1.5}), SamplingParams(temperature=0.0)]
    got = _processed(logits, params)
    expected = logits.clone()
    expected[0, 6] += 10.0
    expected[0, 0] -= 1.5
    assert torch.equal(got, expected)
    assert _sample(logits, params).sampled_token_ids.tolist() == [6, 0]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([[1.0, 5.0, 4.0, 3.0]]).repeat(3, 1)
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    p.update_from_generation_config([2])  # EOS 2 is masked too
    ignoring = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=[1])
    ignoring.update_from_generation_config([2])
    out = _sample(logits, [p, p, ignoring], outputs=[[0], [0, 0], [0]])
    # Row 0: 1 output token < 2, so ids 1 and 2 are masked; row 1 reached min_tokens; row 2 still may emit EOS.
    assert out.sampled_token_ids.tolist() == [3, 1, 2]


def test_logits_processors_called_with_the_right_args():
    calls = []

    def two_args(output_ids, logits):
        calls.append(("two", list(output_ids), logits.shape))
        logits[0] = 100.0
        return logits

    def three_args(prompt_ids, output_ids, logits):
        calls.append(("three", list(prompt_ids), list(output_ids)))
        return logits + torch.arange(logits.shape[0], dtype=logits.dtype)  # a new tensor: its value must be used

    logits = torch.zeros(3, 5)
    params = [SamplingParams(temperature=0.0, logits_processors=[two_args]), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logits_processors=[three_args])]
    out = _sample(logits, params, prompts=[[1], [2], [3, 4]], outputs=[[7], [8], [9, 9]])
    assert calls == [("two", [7], torch.Size([5])), ("three", [3, 4], [9, 9])]
    assert out.sampled_token_ids.tolist() == [0, 0, 4]  # row 1 untouched: argmax of zeros is 0


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(temperature=0.5, logprobs=3, presence_penalty=1.0), SamplingParams(temperature=0.0),
              SamplingParams(logprobs=1, top_k=5), SamplingParams(temperature=0.0, logprobs=0)]
    out = _sample(logits, params, outputs=[[1, 2]] * 4, generator=torch.Generator().manual_seed(9))
    expected = logits.log_softmax(-1)
    ids = out.sampled_token_ids
    assert out.topk_token_ids.shape == (4, 3) and out.topk_logprobs.shape == (4, 3) and out.sampled_ranks.shape == (4,)
    assert torch.allclose(out.sampled_logprobs, expected.gather(1, ids[:, None]).squeeze(1))
    top = expected.topk(3, dim=-1)
    assert torch.equal(out.topk_token_ids, top.indices) and torch.allclose(out.topk_logprobs, top.values)
    ranks = (expected > expected.gather(1, ids[:, None])).sum(-1) + 1
    assert torch.equal(out.sampled_ranks, ranks)
    assert out.sampled_ranks[1].item() == 1 and out.sampled_ranks[3].item() == 1  # greedy rows


def test_sampled_logprobs_only_when_some_row_needs_them():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(10))
    plain = _sample(logits, [SamplingParams()] * 3, generator=torch.Generator().manual_seed(11))
    assert plain.sampled_logprobs is None and plain.topk_token_ids is None
    child = SamplingParams()
    child.compute_cumulative_logprob = True  # a best_of child: ranked by cumulative logprob, no top-k
    out = _sample(logits, [SamplingParams(), child, SamplingParams()], generator=torch.Generator().manual_seed(11))
    assert out.topk_token_ids is None and out.sampled_ranks is None
    assert torch.equal(out.sampled_token_ids, plain.sampled_token_ids)
    expected = logits.log_softmax(-1).gather(1, out.sampled_token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.sampled_logprobs, expected, atol=1e-6)


def test_compute_topk_logprobs_chosen_first():
    logprobs = torch.tensor([[-1.0, -0.5, -3.0, -2.0], [-0.25, -4.0, -3.0, -2.0]])
    ids, lps, ranks = compute_topk_logprobs(logprobs, torch.tensor([3, 0]), 2)
    assert ids.tolist() == [[3, 1, 0], [0, 0, 3]]
    assert lps.tolist() == [[-2.0, -0.5, -1.0], [-0.25, -0.25, -2.0]]
    assert ranks.tolist() == [3, 1]
    ids, lps, ranks = compute_topk_logprobs(logprobs, torch.tensor([2, 1]), 0)
    assert ids.tolist() == [[2], [1]] and lps.tolist() == [[-3.0], [-4.0]] and ranks.tolist() == [4, 4]
    assert compute_topk_logprobs(logprobs, torch.tensor([0, 0]), 50)[0].shape == (2, 5)  # k capped at V


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducible_and_independent_of_batch(device):
    vocab = 64
    logits = torch.zeros(1, vocab, device=device)  # uniform: every draw is informative
    seeded = SamplingParams(seed=1234)
    alone = [_sample(logits, [seeded], outputs=[[0] * pos]).sampled_token_ids.item() for pos in range(12)]
    # Same seed, same positions, but inside a batch with other random and greedy rows and another shared state.
    crowd = torch.zeros(4, vocab, device=device)
    crowd[1, 5] = 3.0
    gen = torch.Generator(device=device).manual_seed(99)
    in_batch = []
    for pos in range(12):
        params = [SamplingParams(), SamplingParams(temperature=0.0), seeded, SamplingParams(seed=7)]
        out = _sample(crowd, params, outputs=[[1] * 3, [], [0] * pos, [2] * pos], generator=gen)
        in_batch.append(out.sampled_token_ids[2].item())
    assert alone == in_batch
    assert len(set(alone)) > 4  # the position feeds the seed: draws differ step to step
    other_seed = [_sample(logits, [SamplingParams(seed=4321)], outputs=[[0] * pos]).sampled_token_ids.item()
                  for pos in range(12)]
    assert other_seed != alone


def test_seeded_rows_do_not_move_other_rows():
    """An unseeded row's draw comes from the shared generator only; seeded neighbours do not consume it."""
    logits = torch.zeros(2, 1000)
    a = _sample(logits, [SamplingParams(), SamplingParams(seed=1)], generator=torch.Generator().manual_seed(5))
    b = _sample(logits, [SamplingParams(), SamplingParams(seed=2)], generator=torch.Generator().manual_seed(5))
    assert a.sampled_token_ids[0] == b.sampled_token_ids[0]
    assert a.sampled_token_ids[1] != b.sampled_token_ids[1]


def test_shared_generator_makes_unseeded_rows_reproducible():
    logits = torch.zeros(8, 1000)
    a = _sample(logits, [SamplingParams()] * 8, generator=torch.Generator().manual_seed(3))
    b = _sample(logits, [SamplingParams()] * 8, generator=torch.Generator().manual_seed(3))
    c = _sample(logits, [SamplingParams()] * 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
    assert not torch.equal(a.sampled_token_ids, c.sampled_token_ids)


def test_mixed_batch_greedy_rows_take_argmax():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(12))
    params = [SamplingParams(temperature=0.0 if i % 2 else 5.0) for i in range(6)]
    gen = torch.Generator().manual_seed(13)
    outs = torch.stack([_sample(logits, params, generator=gen).sampled_token_ids for _ in range(20)])
    assert torch.equal(outs[:, 1::2], logits.argmax(-1)[1::2].expand(20, 3))
    assert (outs[:, 0::2] != logits.argmax(-1)[0::2]).any()  # T=5 over 40 tokens is not argmax every time


def test_masked_tokens_never_sampled():
    logits = torch.tensor([0.0, 0.0, 0.0, -1.0]).repeat(4000, 1)
    out = _sample(logits, [SamplingParams(logit_bias={2: -100.0}, top_k=2)] * 4000,
                  generator=torch.Generator().manual_seed(14))
    counts = _counts(out.sampled_token_ids, 4)
    assert counts[2] == 0 and counts[3] == 0  # 2 is biased away, then top-k keeps only 0 and 1
    assert counts[0] > 1800 and counts[1] > 1800


def test_no_host_sync(monkeypatch):
    """The sampler never reads a device value back (.item(), .tolist(), bool(tensor))."""
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(15))
    params = [SamplingParams(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05, seed=1, logprobs=2,
                             repetition_penalty=1.3, presence_penalty=0.2, logit_bias={3: 1.0}, min_tokens=5,
                             stop_token_ids=[2]),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.9)]
    meta = build_sampling_metadata(_states(params, outputs=[[1, 2], [3], []]), 16, "cpu")

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the sampler")

    for name in ("item", "tolist", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = sampler(logits, meta)
    monkeypatch.undo()
    assert out.sampled_token_ids.shape == (3,) and out.sampled_logprobs.dtype == torch.float32
    assert not math.isnan(out.sampled_logprobs.sum().item())
