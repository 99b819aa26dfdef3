"""Triton penalties and sampling filters vs the Sampler's torch functions (interpreter, CPU tensors).

Filters must keep exactly the same tokens with exactly the same (temperature-scaled) values; penalties must give
bit-identical logits. Rows are crafted so that no top-p boundary sits within float rounding of the cut.
"""
import pytest
import torch

pytest.importorskip("triton")

from graphserve.ops.sampling import _apply_penalties_ref, _apply_sampling_filters_ref  # noqa: E402
from graphserve.ops.triton import sampling  # noqa: E402

INF = float("inf")


def _filters(logits, temperature, top_k=None, top_p=None, min_p=None, **kwargs):
    """(kernel output, reference output) for the same inputs."""
    out, ref = torch.full_like(logits, float("nan")), torch.empty_like(logits)
    sampling.apply_sampling_filters(out, logits, temperature, top_k, top_p, min_p, **kwargs)
    _apply_sampling_filters_ref(ref, logits, temperature, top_k, top_p, min_p)
    return out, ref


def _assert_same_filtering(out, ref):
    kept, kept_ref = out.isfinite(), ref.isfinite()
    assert torch.equal(kept, kept_ref), (kept.sum(-1).tolist(), kept_ref.sum(-1).tolist())
    assert torch.equal(out[kept], ref[kept_ref])
    assert torch.all(out[~kept] == -INF)


def _tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_crafted_rows_ties_top_k_one_tiny_top_p_min_p():
    row = [0.5, 3.0, 1.0, 3.0, -2.0, 2.0, 3.0, -INF, 0.0, -0.0, 1.0, 2.0]
    logits = _tensor([row] * 8)
    top_k = torch.tensor([2, 4, 1, 12, 12, 7, 3, 12])  # 2: ties at the k-th value keep all three 3.0s
    top_p = _tensor([1.0, 1.0, 1.0, 1e-6, 0.9, 1.0, 0.5, 1.0])
    min_p = _tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.01])
    temperature = _tensor([1.0, 0.5, 1.0, 1.0, 2.0, 1.0, 0.7, 1.0])
    out, ref = _filters(logits, temperature, top_k, top_p, min_p)
    _assert_same_filtering(out, ref)
    assert out[0].isfinite().sum() == 3 and out[2].isfinite().sum() == 3  # top_k=1 keeps every tie at the max
    assert out[3].isfinite().sum() == 3  # a tiny top_p still keeps the top token (and its ties)


def test_zero_signs_tie_and_all_equal_row():
    logits = _tensor([[0.0, -0.0, -1.0, -3.0], [2.0, 2.0, 2.0, 2.0]])
    out, ref = _filters(logits, _tensor([1.0, 1.0]), top_k=torch.tensor([2, 1]))
    _assert_same_filtering(out, ref)
    assert out.isfinite().sum(-1).tolist() == [2, 4]


def test_nucleus_cut_and_each_filter_alone():
    probs = _tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.6, 0.1, 0.1, 0.1, 0.1]])
    logits = probs.log() + 1.5
    temperature = _tensor([1.0, 1.0])
    out, ref = _filters(logits, temperature, top_p=_tensor([0.75, 0.65]))
    _assert_same_filtering(out, ref)
    assert out.isfinite().tolist() == [[False, True, False, True, True], [True] * 5]  # 0.7 < 0.75; ties kept
    for kwargs in (dict(top_k=torch.tensor([2, 5])), dict(min_p=_tensor([0.5, 0.2]))):
        _assert_same_filtering(*_filters(logits, temperature, **kwargs))


def test_mixed_batch_rows_without_filters_are_only_scaled():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 4
    logits[1, :7] = -INF  # e.g. min_tokens masking: stays -inf, is never kept
    temperature = _tensor([1.0, 0.8, 1.3, 0.6])
    top_k = torch.tensor([300, 40, 300, 1])
    top_p = _tensor([1.0, 0.9, 1.0, 0.2])
    min_p = _tensor([0.0, 0.0, 0.0, 0.05])
    out, ref = _filters(logits, temperature, top_k, top_p, min_p)
    _assert_same_filtering(out, ref)
    torch.testing.assert_close(out[[0, 2]], logits[[0, 2]] / temperature[[0, 2], None], rtol=0, atol=0)


@pytest.mark.parametrize("num_pivots,accumulate_2d", [(4, True), (16, False)])
def test_random_rows_several_blocks(num_pivots, accumulate_2d):
    """A vocabulary of 1.5 blocks, logits across a wide key range (tiny and huge magnitudes, both signs)."""
    g = torch.Generator().manual_seed(1)
    vocab_size = 1536
    logits = torch.randn(6, vocab_size, generator=g) * 3
    logits[2] *= 1e-30  # keys of both signs around zero, a span wider than 2**31
    logits[3, ::5] = 1e30
    top_k = torch.tensor([1, 37, 500, 1000, vocab_size, 3])
    top_p = _tensor([1.0, 0.8, 0.95, 1.0, 0.6, 1.0])
    min_p = _tensor([0.0, 0.01, 0.0, 0.0, 0.0, 0.0])
    out, ref = _filters(logits, _tensor([1.0, 1.1, 0.9, 1.0, 1.5, 0.5]), top_k, top_p, min_p,
                        num_pivots=num_pivots, accumulate_2d=accumulate_2d)
    _assert_same_filtering(out, ref)


def test_fp16_logits_are_read_and_scaled_in_fp32():
    logits = (torch.randn(3, 200, generator=torch.Generator().manual_seed(2)) * 3).half()
    out = torch.empty(3, 200)
    temperature, top_k = _tensor([0.7, 1.0, 1.0]), torch.tensor([10, 200, 50])
    sampling.apply_sampling_filters(out, logits, temperature, top_k, None, None)
    ref = torch.empty(3, 200)
    _apply_sampling_filters_ref(ref, logits.float(), temperature, top_k, None, None)
    _assert_same_filtering(out, ref)


def _penalty_inputs(vocab_size: int):
    pad = vocab_size
    output_ids = torch.tensor([
        [3, 3, 5, 3, pad, pad], [7, pad, pad, pad, pad, pad], [1, 2, 3, 4, 1, 2],
        [pad] * 6, [0, 0, 0, 0, 0, 0], [vocab_size - 1, 5, vocab_size - 1, 9, pad, pad],
    ])
    prompt_ids = torch.tensor([[3, 9, pad], [8, 8, 8], [1, pad, pad], [4, 6, pad], [10, 11, 12], [5, 9, 9]])
    presence = _tensor([0.5, 0.0, 1.0, 0.3, -0.5, 0.2])
    frequency = _tensor([0.1, 0.2, 0.0, 0.4, 0.3, -0.1])
    repetition = _tensor([1.2, 1.0, 0.8, 1.5, 2.0, 1.1])
    return output_ids, prompt_ids, presence, frequency, repetition


@pytest.mark.parametrize("with_prompt", [True, False])
def test_penalties_bit_identical(with_prompt):
    """Repeated output tokens, prompt-only tokens, tokens in both, padding, positive and negative logits."""
    vocab_size = 40
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(3)) * 2
    output_ids, prompt_ids, presence, frequency, repetition = _penalty_inputs(vocab_size)
    prompt_ids = prompt_ids if with_prompt else None
    out, ref = logits.clone(), logits.clone()
    sampling.apply_penalties(out, output_ids, prompt_ids, presence, frequency, repetition)
    _apply_penalties_ref(ref, output_ids, prompt_ids, presence, frequency, repetition)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(out, logits)
    # Row 0: token 3 seen three times in the output and once in the prompt is penalized exactly once.
    expected = logits[0, 3] / 1.2 if with_prompt and logits[0, 3] > 0 else (
        logits[0, 3] * 1.2 if with_prompt else logits[0, 3])
    assert torch.isclose(out[0, 3], expected - 0.1 * 3 - 0.5)


def test_penalty_ops_opcheck():
    vocab_size = 16
    output_ids, prompt_ids, presence, frequency, repetition = _penalty_inputs(vocab_size)
    output_ids = output_ids.clamp(max=vocab_size)
    prompt_ids = prompt_ids.clamp(max=vocab_size)
    logits = torch.randn(6, vocab_size)
    torch.library.opcheck(torch.ops.graphserve.apply_penalties.default,
                          (logits, output_ids, prompt_ids, presence, frequency, repetition))
    torch.library.opcheck(torch.ops.graphserve.apply_sampling_filters.default,
                          (torch.empty(6, vocab_size), logits, torch.ones(6), torch.full((6,), 3), None,
                           torch.full((6,), 0.1)))
