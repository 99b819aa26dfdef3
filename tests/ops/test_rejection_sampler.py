"""Rejection sampler op: greedy tables and edge cases against a per-request loop oracle, the torch reference's output
distribution against p (chi-square, TV, acceptance rate; adversarial drafts), the Triton kernel against the
reference (interpreter, CPU tensors, odd vocabularies, several V blocks), determinism, the schema through opcheck."""
import os
import subprocess
import sys

import pytest
import torch

from graphserve.ops import rejection_sampler as rs
from tests.sample.distribution_testutils import chi2_pvalue

PH = rs.PLACEHOLDER_TOKEN_ID
IMPLS = ["torch", "triton"]


def _run(impl: str, inputs: dict, max_spec_len: int, block_v: int = 16) -> torch.Tensor:
    """The op's output through the torch reference (the CPU dispatch) or the Triton kernel (interpreter)."""
    if impl == "torch":
        return rs.rejection_sample(**inputs, max_spec_len=max_spec_len)
    from graphserve.ops.triton import rejection_sampler as triton_rs

    draft_probs = inputs["draft_probs"]
    if draft_probs is None:
        draft_probs = inputs["target_probs"].new_empty((0, inputs["target_probs"].shape[1]))
    out = torch.empty(inputs["cu_num_draft_tokens"].shape[0], max_spec_len + 1, dtype=torch.int64)
    triton_rs.launch(out, inputs["draft_token_ids"], inputs["cu_num_draft_tokens"], draft_probs,
                     inputs["target_probs"], inputs["bonus_token_ids"], inputs["is_greedy"], inputs["uniform"],
                     inputs["recover_noise"], block_v=block_v)
    return out


def _inputs(ks: list[int], vocab: int, greedy: list[bool], seed: int, with_draft_probs: bool = True,
            sparse: bool = False) -> dict:
    """Random inputs: drafts drawn from q (a mix of p and another distribution); `sparse` zeroes about half of
    each row of p and q (as top-k would) and replaces a quarter of the drafts by arbitrary tokens (q(d) may be 0)."""
    g = torch.Generator().manual_seed(seed)
    num_reqs, num_tokens = len(ks), sum(ks)
    p = (torch.randn(num_tokens, vocab, generator=g) * 2).softmax(-1)
    q = 0.6 * p + 0.4 * (torch.randn(num_tokens, vocab, generator=g) * 2).softmax(-1)
    if sparse:
        p = p * (torch.rand(num_tokens, vocab, generator=g) < 0.5)
        q = q * (torch.rand(num_tokens, vocab, generator=g) < 0.5)
        p[:, 0] += 1e-3  # no empty row
        q[:, 1] += 1e-3
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    draft = torch.multinomial(q, 1, generator=g).squeeze(1) if num_tokens else torch.zeros(0, dtype=torch.int64)
    if sparse and num_tokens:
        swap = torch.rand(num_tokens, generator=g) < 0.25
        draft = torch.where(swap, torch.randint(0, vocab, (num_tokens,), generator=g), draft)
    return {
        "draft_token_ids": draft,
        "cu_num_draft_tokens": torch.tensor(ks, dtype=torch.int64).cumsum(0).to(torch.int32),
        "draft_probs": q if with_draft_probs else None,
        "target_probs": p,
        "bonus_token_ids": torch.randint(0, vocab, (num_reqs,), generator=g),
        "is_greedy": torch.tensor(greedy, dtype=torch.bool),
        "uniform": torch.rand(num_tokens, generator=g),
        "recover_noise": torch.empty(num_reqs, vocab).exponential_(generator=g),
    }


def _oracle(inputs: dict, max_spec_len: int) -> list[list[int]]:
    """The algorithm request by request, position by position, padded with -1."""
    p, q = inputs["target_probs"], inputs["draft_probs"]
    draft, uniform = inputs["draft_token_ids"].tolist(), inputs["uniform"]
    rows, start = [], 0
    for req, end in enumerate(inputs["cu_num_draft_tokens"].tolist()):
        row = []
        for t in range(start, end):
            d = draft[t]
            if bool(inputs["is_greedy"][req]):
                replacement = int(p[t].argmax())
                accepted = d == replacement
            else:
                q_d = torch.tensor(1.0) if q is None else q[t, d]
                accepted = bool(q_d > 0 and p[t, d] / q_d >= uniform[t])
                residual = p[t].clone()
                if q is None:
                    residual[d] = 0.0
                else:
                    residual = (p[t] - q[t]).clamp_min(0.0)
                score = torch.where(residual > 0, residual / inputs["recover_noise"][req], -1.0)
                replacement = int(score.argmax()) if score.max() > 0 else int(p[t].argmax())
            if not accepted:
                row.append(replacement)
                break
            row.append(d)
        else:
            row.append(int(inputs["bonus_token_ids"][req]))
        rows.append(row + [PH] * (max_spec_len + 1 - len(row)))
        start = end
    return rows


def _greedy_inputs(drafts: list[list[int]], argmaxes: list[list[int]], bonus: list[int], vocab: int = 8) -> dict:
    """Greedy requests whose target rows peak at the given tokens."""
    ks = [len(d) for d in drafts]
    flat = [t for row in argmaxes for t in row]
    p = torch.full((len(flat), vocab), 0.5 / vocab)
    p[torch.arange(len(flat)), torch.tensor(flat, dtype=torch.int64)] += 0.5
    return {
        "draft_token_ids": torch.tensor([t for row in drafts for t in row], dtype=torch.int64),
        "cu_num_draft_tokens": torch.tensor(ks).cumsum(0).to(torch.int32),
        "draft_probs": None,
        "target_probs": p,
        "bonus_token_ids": torch.tensor(bonus, dtype=torch.int64),
        "is_greedy": torch.ones(len(ks), dtype=torch.bool),
        "uniform": torch.rand(len(flat)),
        "recover_noise": torch.ones(len(ks), vocab),
    }


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_tables(impl):
    drafts = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [], [4], [5, 6, 7, 0]]
    argmaxes = [[1, 2, 3], [0, 2, 3], [1, 7, 3], [1, 2, 6], [], [4], [5, 6, 7, 1]]
    inputs = _greedy_inputs(drafts, argmaxes, bonus=[7, 7, 7, 7, 5, 6, 2])
    assert _run(impl, inputs, max_spec_len=4).tolist() == [
        [1, 2, 3, 7, PH],  # all match: drafts + bonus
        [0, PH, PH, PH, PH],  # mismatch at the first position
        [1, 7, PH, PH, PH],
        [1, 2, 6, PH, PH],
        [5, PH, PH, PH, PH],  # k = 0: the bonus in column 0
        [4, 6, PH, PH, PH],
        [5, 6, 7, 1, PH],  # mismatch at the last of k = max_spec_len
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_no_drafts_anywhere(impl):
    inputs = _inputs([0, 0, 0], 11, [True, False, False], seed=0)
    assert _run(impl, inputs, max_spec_len=2).tolist() == [[b, PH, PH] for b in inputs["bonus_token_ids"].tolist()]


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_greedy_and_random_with_known_outcomes(impl):
    """Random request 1 has q == p (always accepted); random request 3 has p peaked at 4, q uniform and drafts 2
    (rejected at once, max(0, p - q) lives on token 4 alone); greedy requests 0 and 2 match / mismatch."""
    vocab = 6
    base = _greedy_inputs([[3, 1], [2, 5, 0], [1, 1], [2, 2]], [[3, 1], [0, 0, 0], [1, 2], [4, 4]], [0, 1, 2, 3],
                          vocab)
    p = base["target_probs"]
    p[2:5] = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    q = p.clone()
    q[7:9] = torch.full((vocab,), 1.0 / vocab)
    base.update(draft_probs=q, is_greedy=torch.tensor([True, False, True, False]),
                uniform=torch.full((9,), 0.999), recover_noise=torch.rand(4, vocab) + 0.1)
    expected = [[3, 1, 0, PH], [2, 5, 0, 1], [1, 2, PH, PH], [4, PH, PH, PH]]
    assert _run(impl, base, max_spec_len=3).tolist() == expected
    assert _oracle(base, 3) == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_variable_k_matches_the_oracle(impl):
    ks = [1, 4, 2, 0, 3, 4, 2]
    for seed in range(3):
        inputs = _inputs(ks, 13, [seed % 2 == 0, True, False, True, False, False, True], seed, sparse=seed == 2)
        assert _run(impl, inputs, max_spec_len=5).tolist() == _oracle(inputs, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_draft_equal_to_target_accepts_everything(impl):
    inputs = _inputs([3, 2, 4], 17, [False] * 3, seed=1)
    inputs["draft_probs"] = inputs["target_probs"].clone()
    inputs["uniform"] = torch.full_like(inputs["uniform"], 0.9999)
    out = _run(impl, inputs, max_spec_len=4)
    bonus = inputs["bonus_token_ids"].tolist()
    d = inputs["draft_token_ids"].tolist()
    assert out.tolist() == [d[0:3] + [bonus[0], PH], d[3:5] + [bonus[1], PH, PH], d[5:9] + [bonus[2]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_disjoint_draft_rejects_at_once_and_recovers_from_p(impl):
    vocab = 10
    inputs = _inputs([2, 3, 1], vocab, [False] * 3, seed=2)
    p = torch.zeros(6, vocab)
    p[:, :5] = torch.rand(6, 5) + 0.1
    q = torch.zeros(6, vocab)
    q[:, 5:] = torch.rand(6, 5) + 0.1
    inputs.update(target_probs=p / p.sum(-1, keepdim=True), draft_probs=q / q.sum(-1, keepdim=True),
                  draft_token_ids=torch.randint(5, vocab, (6,)), uniform=torch.rand(6) * 0.9 + 0.05)
    out = _run(impl, inputs, max_spec_len=3)
    assert (out[:, 1:] == PH).all() and ((out[:, 0] >= 0) & (out[:, 0] < 5)).all()
    assert out.tolist() == _oracle(inputs, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_draft_probs_accepts_with_probability_p_of_the_draft(impl):
    """n-gram drafts: q(d) = 1, so u <= p(d) accepts; a rejection draws from p with p(d) zeroed."""
    p = torch.tensor([[0.1, 0.3, 0.2, 0.25, 0.15]] * 4)
    inputs = {
        "draft_token_ids": torch.tensor([1, 1, 1, 1]),
        "cu_num_draft_tokens": torch.tensor([2, 4], dtype=torch.int32),
        "draft_probs": None,
        "target_probs": p,
        "bonus_token_ids": torch.tensor([4, 0]),
        "is_greedy": torch.tensor([False, False]),
        "uniform": torch.tensor([0.2, 0.29, 0.2, 0.31]),
        # The race favours token 1 (the rejected draft, excluded) and then token 2.
        "recover_noise": torch.tensor([[1.0, 1e-3, 0.5, 1.0, 1.0]] * 2),
    }
    assert _run(impl, inputs, max_spec_len=2).tolist() == [[1, 1, 4], [1, 2, PH]]
    assert _oracle(inputs, 2) == [[1, 1, 4], [1, 2, PH]]


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_residual_falls_back_to_argmax_p(impl):
    """q == p and a draft with q(d) = 0 is rejected with nothing left in max(0, p - q): emit argmax p, no NaN."""
    p = torch.tensor([[0.0, 0.2, 0.5, 0.3], [0.0, 0.6, 0.1, 0.3]])
    inputs = {
        "draft_token_ids": torch.tensor([0, 0]),
        "cu_num_draft_tokens": torch.tensor([1, 2], dtype=torch.int32),
        "draft_probs": p.clone(),
        "target_probs": p,
        "bonus_token_ids": torch.tensor([3, 3]),
        "is_greedy": torch.tensor([False, False]),
        "uniform": torch.tensor([0.0, 0.5]),
        "recover_noise": torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),  # zeros: no 0/0
    }
    assert _run(impl, inputs, max_spec_len=1).tolist() == [[2, PH], [1, PH]]


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy division
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_noise_wins_the_race(impl):
    """Exp(1) noise can be exactly 0: residual / 0 = inf picks that token (the first such one)."""
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    inputs = {
        "draft_token_ids": torch.tensor([0]),
        "cu_num_draft_tokens": torch.tensor([1], dtype=torch.int32),
        "draft_probs": torch.tensor([[0.9, 0.0, 0.05, 0.05]]),
        "target_probs": p,
        "bonus_token_ids": torch.tensor([1]),
        "is_greedy": torch.tensor([False]),
        "uniform": torch.tensor([0.9]),
        "recover_noise": torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
    }
    assert _run(impl, inputs, max_spec_len=1).tolist() == [[2, PH]]


def _simulate(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n identical random requests with k = 2 (p: [3, V] including the bonus position, q: [2, V]) in one batch."""
    g = torch.Generator().manual_seed(seed)
    vocab = p.shape[1]
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(2)], 1)
    return rs.rejection_sample(
        draft_token_ids=drafts.reshape(-1),
        cu_num_draft_tokens=torch.arange(2, 2 * n + 1, 2, dtype=torch.int32),
        draft_probs=q.repeat(n, 1),
        target_probs=p[:2].repeat(n, 1),
        bonus_token_ids=torch.multinomial(p[2], n, replacement=True, generator=g),
        is_greedy=torch.zeros(n, dtype=torch.bool),
        uniform=torch.rand(2 * n, generator=g),
        recover_noise=torch.empty(n, vocab).exponential_(generator=g),
        max_spec_len=2,
    )


def _draft_cases(vocab: int = 10) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    p = torch.randn(3, vocab, generator=g).softmax(-1)
    one_hot = torch.zeros(2, vocab)
    one_hot[:, 3] = 1.0
    low, high = torch.zeros(3, vocab), torch.zeros(2, vocab)
    low[:, :5] = torch.rand(3, 5, generator=g) + 0.1
    high[:, 5:] = torch.rand(2, 5, generator=g) + 0.1
    return {
        "random": (p, torch.randn(2, vocab, generator=g).softmax(-1)),
        "equal": (p, p[:2].clone()),
        "uniform": (p, torch.full((2, vocab), 1.0 / vocab)),
        "one_hot": (p, one_hot),
        "disjoint": (low / low.sum(-1, keepdim=True), high / high.sum(-1, keepdim=True)),
    }


@pytest.mark.parametrize("case", list(_draft_cases()))
def test_output_distribution_equals_target(case):
    p, q = _draft_cases()[case]
    n, vocab = 100_000, p.shape[1]
    out = _simulate(p, q, n, seed=11)
    first = torch.bincount(out[:, 0], minlength=vocab)
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert 0.5 * (first / n - p[0]).abs().sum() < 3 * (vocab / n) ** 0.5
    # Acceptance of the first draft: a filled second column.
    accepted = out[:, 1] != PH
    alpha = float(torch.minimum(p[0], q[0]).sum())
    assert abs(float(accepted.double().mean()) - alpha) <= 4 * (alpha * (1 - alpha) / n) ** 0.5 + 1e-9
    # After an accepted first draft, the second column is distributed as p_2 (drafts independent of context here).
    if int(accepted.sum()) > 1000:
        assert chi2_pvalue(torch.bincount(out[accepted, 1], minlength=vocab), p[1]) > 1e-3
    both = out[:, 2] != PH
    if int(both.sum()) > 1000:
        assert chi2_pvalue(torch.bincount(out[both, 2], minlength=vocab), p[2]) > 1e-3


triton_rs = pytest.importorskip("graphserve.ops.triton.rejection_sampler")


@pytest.mark.parametrize("vocab,block_v", [(37, 16), (37, 64), (1000, 128), (1000, 1024)])
@pytest.mark.parametrize("with_draft_probs", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_triton_matches_reference(vocab, block_v, with_draft_probs, sparse):
    for seed in range(2):
        g = torch.Generator().manual_seed(100 + seed)
        num_reqs = int(torch.randint(1, 8, (1,), generator=g))
        ks = torch.randint(0, 5, (num_reqs,), generator=g).tolist()
        greedy = (torch.rand(num_reqs, generator=g) < 0.4).tolist()
        inputs = _inputs(ks, vocab, greedy, seed, with_draft_probs, sparse)
        ref = _run("torch", inputs, max_spec_len=4)
        assert torch.equal(_run("triton", inputs, max_spec_len=4, block_v=block_v), ref), (ks, greedy)
        assert torch.equal(_run("torch", inputs, max_spec_len=4), ref)  # deterministic in its inputs
        assert torch.equal(_run("triton", inputs, max_spec_len=4, block_v=block_v), ref)


def test_triton_breaks_ties_like_the_reference():
    """Equal maxima in different V blocks: both take the lowest index (greedy argmax and the fallback)."""
    p = torch.full((2, 300), 0.5 / 300)
    p[:, [70, 250]] += 0.25
    inputs = {
        "draft_token_ids": torch.tensor([250, 5]),
        "cu_num_draft_tokens": torch.tensor([1, 2], dtype=torch.int32),
        "draft_probs": None,
        "target_probs": p,
        "bonus_token_ids": torch.tensor([1, 1]),
        "is_greedy": torch.tensor([True, True]),
        "uniform": torch.zeros(2),
        "recover_noise": torch.ones(2, 300),
    }
    assert _run("torch", inputs, 1).tolist() == [[70, PH], [70, PH]]
    assert _run("triton", inputs, 1, block_v=64).tolist() == [[70, PH], [70, PH]]


def test_ops_pass_opcheck():
    for with_draft_probs in (True, False):
        inputs = _inputs([2, 0, 3], 19, [False, True, False], seed=3, with_draft_probs=with_draft_probs)
        draft_probs = inputs.pop("draft_probs")
        if draft_probs is None:
            draft_probs = torch.empty(0, 19)
        out = torch.empty(3, 4, dtype=torch.int64)
        torch.library.opcheck(torch.ops.graphserve.rejection_sample.default,
                              (out, inputs["draft_token_ids"], inputs["cu_num_draft_tokens"], draft_probs,
                               inputs["target_probs"], inputs["bonus_token_ids"], inputs["is_greedy"],
                               inputs["uniform"], inputs["recover_noise"]))


def test_schema_and_parse_output():
    from graphserve.ops._register import get_op

    assert get_op("rejection_sample").schema == (
        "(Tensor(a0!) out, Tensor draft_token_ids, Tensor cu_num_draft_tokens, Tensor draft_probs, "
        "Tensor target_probs, Tensor bonus_token_ids, Tensor is_greedy, Tensor uniform, Tensor recover_noise) -> ()"
    )
    out = torch.tensor([[5, PH, PH], [1, 2, 3], [7, 12, PH]])
    assert rs.parse_output(out, vocab_size=10) == [[5], [1, 2, 3], [7]]
    assert rs.parse_output(out.tolist(), vocab_size=13) == [[5], [1, 2, 3], [7, 12]]


def test_register_triton_kernels_attaches_the_kernel():
    """In a fresh interpreter, so this process's dispatcher keeps no CUDA kernel other tests could see."""
    code = (
        "import graphserve.ops\n"
        "from graphserve.ops._register import get_op\n"
        "from graphserve.ops.triton import register_triton_kernels, rejection_sampler\n"
        "assert set(get_op('rejection_sample').kernels) == {'CompositeExplicitAutograd'}\n"
        "assert register_triton_kernels('CUDA')['rejection_sample'] == 'triton'\n"
        "assert get_op('rejection_sample').kernels['CUDA'] is rejection_sampler.rejection_sample\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"})
