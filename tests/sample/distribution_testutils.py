"""Goodness-of-fit helper of the sampling tests (the rejection sampler op and its component)."""
import torch


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= chi-square statistic) for counts against probs over the bins with probs > 0 (df = bins - 1)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "draws outside the support of p"
    n = counts.sum().double()
    expected = probs[support].double() * n
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))
