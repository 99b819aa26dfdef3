"""The verify step's sampling component: each position's distribution is exactly what plain decoding would sample
there, with the request's penalties counting the drafts before it, its temperature and top-k; greedy rows give the
argmax run; seeded rows are reproducible; logprobs are those of the emitted tokens under the raw logits."""
import torch

from graphserve.sample import Sampler, SamplingRequestState
from graphserve.sample.rejection_sampler import RejectionSampler
from graphserve.sampling_params import SamplingParams
from tests.sample.distribution_testutils import chi2_pvalue

V = 6
PROMPT = [5, 5]
DRAFTS = [2, 4]


def _expected_probs(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
    """Presence penalty 0.6 on tokens already output, temperature 0.7, top-k 4, softmax (written out by hand)."""
    x = logits.clone().double()
    for t in set(output):
        x[t] -= 0.6
    x = x / 0.7
    kth = x.topk(4).values[-1]
    x[x < kth] = float("-inf")
    return x.softmax(-1)


def _requests(n, params):
    return [SamplingRequestState(f"r{i}", params, PROMPT, []) for i in range(n)]


def test_each_position_is_distributed_as_plain_decoding():
    torch.manual_seed(0)
    rows = torch.randn(3, V) * 1.5  # positions 0 and 1 (drafts) and the bonus position
    rows[0, DRAFTS[0]] += 2.0  # drafts likely enough that both get accepted often
    rows[1, DRAFTS[1]] += 3.0
    params = SamplingParams(temperature=0.7, top_k=4, presence_penalty=0.6, max_tokens=10)
    n, calls = 4000, 5
    sampler = RejectionSampler(Sampler())
    gen = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(calls):
        logits = rows.repeat(n, 1)
        out = sampler(logits, _requests(n, params), [DRAFTS] * n, gen).sampled_token_ids
        outs.append(out)
    out = torch.cat(outs)
    p0 = _expected_probs(rows[0], [])
    p1 = _expected_probs(rows[1], DRAFTS[:1])
    p2 = _expected_probs(rows[2], DRAFTS)
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), p0) > 1e-3
    accepted = out[:, 0] == DRAFTS[0]
    assert chi2_pvalue(torch.bincount(out[accepted, 1], minlength=V), p1) > 1e-3
    both = accepted & (out[:, 1] == DRAFTS[1])
    assert both.sum() > 200
    assert chi2_pvalue(torch.bincount(out[both, 2], minlength=V), p2) > 1e-3
    # The acceptance rate of the first draft is p0(d0) for a one-hot (n-gram) draft.
    assert abs(accepted.double().mean() - p0[DRAFTS[0]]) < 0.02


def test_greedy_seeded_and_plain_rows_share_a_step():
    torch.manual_seed(3)
    logits = torch.randn(3 + 3 + 1, V)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=10, logprobs=2)
    reqs = [SamplingRequestState("g", greedy, PROMPT, []), SamplingRequestState("s", seeded, PROMPT, []),
            SamplingRequestState("p", greedy, PROMPT, [])]
    drafts = [[int(logits[0].argmax()), 0], [1, 3], []]  # greedy: first draft right, second one maybe
    sampler = RejectionSampler(Sampler())
    out = sampler(logits, reqs, drafts, torch.Generator().manual_seed(0))
    tokens = out.sampled_token_ids.tolist()
    expect_g = [drafts[0][0]]
    expect_g.append(0 if int(logits[1].argmax()) == 0 else int(logits[1].argmax()))
    if expect_g[1] == 0:
        expect_g.append(int(logits[2].argmax()))
    assert [t for t in tokens[0] if t >= 0] == expect_g
    assert [t for t in tokens[2] if t >= 0] == [int(logits[6].argmax())]  # no drafts: plain greedy
    again = sampler(logits, reqs, drafts, torch.Generator().manual_seed(99))
    assert again.sampled_token_ids[1].tolist() == tokens[1]  # seeded: independent of the engine generator
    # Logprobs rows: one per emitted token, under the raw logits.
    assert out.logprob_row_starts == [0, 3, 6]
    raw = logits.log_softmax(-1)
    for row, req_tokens in zip(out.logprob_row_starts, tokens):
        for j, t in enumerate(x for x in req_tokens if x >= 0):
            assert torch.isclose(out.sampled_logprobs[row + j], raw[row + j, t])
