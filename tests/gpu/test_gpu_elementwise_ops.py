"""The norm, RoPE, activation and sampling ops on CUDA tensors (the Triton kernels) against the torch reference, at
Llama-3-8B shapes: 8 192 tokens, hidden 4 096, intermediate 14 336, 32 / 8 heads of 128; batch 256 x vocab 128 256.

The kernels run through `torch.ops.graphserve.*` (the dispatcher picks the CUDA kernel); the references
(`get_op(name).reference`) run on fp32 copies. bf16: ||out - ref|| / ||ref|| < 1e-2, fp32: < 1e-5. Penalties
must be bit-identical; the filters must keep the same tokens as the reference.
"""
from __future__ import annotations

import pytest
import torch
from gpu_testutils import rel_err

import graphserve.ops  # noqa: F401  (defines the ops)
from graphserve.ops._register import get_op

NUM_TOKENS, HIDDEN, INTERMEDIATE = 8192, 4096, 14336
HEADS = (32, 8, 128)  # (num_heads, num_kv_heads, head_dim)
BATCH, VOCAB = 256, 128256
EPS = 1e-5
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
OPS = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "apply_penalties",
       "apply_sampling_filters")


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal samples on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def fp32_copy(x: torch.Tensor) -> torch.Tensor:
    """An fp32 copy that never aliases `x` (`.float()` of an fp32 tensor is the tensor itself)."""
    return x.to(torch.float32, copy=True)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"||out - ref|| / ||ref|| = {err:.2e} >= {TOL[dtype]}"


@pytest.fixture(autouse=True, scope="module")
def _kernels(cuda_kernels):
    """The Triton kernels on the CUDA key, so the op calls below run them and not the reference."""
    for name in OPS:
        assert "CUDA" in get_op(name).kernels, f"no CUDA kernel registered for graphserve::{name}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(dtype):
    """rms_norm over 8 192 x 4 096 stays within the dtype's bound of the fp32 reference."""
    x = randn(NUM_TOKENS, HIDDEN, seed=0, scale=3.0, dtype=dtype)
    w = randn(HIDDEN, seed=1, dtype=dtype)
    out = torch.full_like(x, float("nan"))
    torch.ops.graphserve.rms_norm(out, x, w, EPS)
    ref = torch.empty(NUM_TOKENS, HIDDEN, device="cuda")
    get_op("rms_norm").reference(ref, x.float(), w.float(), EPS)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(dtype):
    """fused_add_rms_norm over 8 192 x 4 096, in place: the new residual and the normalized output both stay within
    the dtype's bound of the fp32 reference."""
    x = randn(NUM_TOKENS, HIDDEN, seed=0, scale=3.0, dtype=dtype)
    residual = randn(NUM_TOKENS, HIDDEN, seed=2, scale=2.0, dtype=dtype)
    w = randn(HIDDEN, seed=1, dtype=dtype)
    x_ref, residual_ref = fp32_copy(x), fp32_copy(residual)  # the reference works in place too
    get_op("fused_add_rms_norm").reference(x_ref, residual_ref, w.float(), EPS)
    torch.ops.graphserve.fused_add_rms_norm(x, residual, w, EPS)
    assert_close(residual, residual_ref, dtype)
    assert_close(x, x_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    """silu_and_mul of 8 192 x (2 x 14 336) stays within the dtype's bound of the fp32 reference."""
    x = randn(NUM_TOKENS, 2 * INTERMEDIATE, seed=3, scale=2.0, dtype=dtype)
    out = torch.full((NUM_TOKENS, INTERMEDIATE), float("nan"), dtype=dtype, device="cuda")
    torch.ops.graphserve.silu_and_mul(out, x)
    ref = torch.empty(NUM_TOKENS, INTERMEDIATE, device="cuda")
    get_op("silu_and_mul").reference(ref, x.float())
    assert_close(out, ref, dtype)


def cos_sin_cache(max_position: int, rotary_dim: int) -> torch.Tensor:
    """[max_position, rotary_dim] fp32, cos then sin, Llama-3's base."""
    inv_freq = 500000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cuda") / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64, device="cuda")[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), -1).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("is_neox", "rotary_dim"), [(True, 128), (False, 128), (True, 64)],
                         ids=["neox", "gptj", "neox-partial"])
def test_rotary_embedding_matches_reference(dtype, is_neox, rotary_dim):
    """RoPE in place on the q and k slices of a packed qkv (8 192 tokens, positions up to 8k) stays within the
    dtype's bound of the fp32 reference; v is untouched."""
    num_heads, num_kv_heads, head_dim = HEADS
    qkv = randn(NUM_TOKENS, (num_heads + 2 * num_kv_heads) * head_dim, seed=4, dtype=dtype)
    positions = torch.randint(0, 8192, (NUM_TOKENS,), generator=torch.Generator(device="cuda").manual_seed(5),
                              device="cuda")
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    cache = cos_sin_cache(8192, rotary_dim)
    ref = fp32_copy(qkv)
    q_ref, k_ref, _ = ref.split(sizes, dim=-1)
    get_op("rotary_embedding").reference(positions, q_ref, k_ref, head_dim, cache, is_neox)
    before = qkv.clone()
    q, k, _ = qkv.split(sizes, dim=-1)
    torch.ops.graphserve.rotary_embedding(positions, q, k, head_dim, cache, is_neox)
    assert_close(qkv, ref, dtype)
    assert torch.equal(qkv[:, sum(sizes[:2]):], before[:, sum(sizes[:2]):])
    assert not torch.equal(qkv, before)


def penalty_inputs():
    """Logits, right-padded output ids (many repeats) and prompt ids, per-row penalties."""
    g = torch.Generator(device="cuda").manual_seed(7)
    logits = randn(BATCH, VOCAB, seed=6, scale=3.0)
    output_ids = torch.randint(0, 2000, (BATCH, 256), generator=g, device="cuda")
    prompt_ids = torch.randint(0, VOCAB, (BATCH, 1024), generator=g, device="cuda")
    lengths = torch.randint(0, 257, (BATCH, 1), generator=g, device="cuda")
    output_ids[torch.arange(256, device="cuda")[None, :] >= lengths] = VOCAB  # right padding
    presence, frequency, repetition = (torch.rand(BATCH, generator=g, device="cuda") for _ in range(3))
    return logits, output_ids, prompt_ids, presence, frequency - 0.5, 0.8 + repetition


@pytest.mark.parametrize("with_prompt", [True, False], ids=["prompt-and-output", "output-only"])
def test_apply_penalties_bit_identical_to_reference(with_prompt):
    """Repetition, frequency and presence penalties on 256 x 128 256 fp32 logits (256 output ids, 1 024 prompt
    ids per row): every logit equals the reference's exactly, and many changed."""
    logits, output_ids, prompt_ids, *penalties = penalty_inputs()
    prompt = prompt_ids if with_prompt else None
    out, ref = logits.clone(), logits.clone()
    torch.ops.graphserve.apply_penalties(out, output_ids, prompt, *penalties)
    get_op("apply_penalties").reference(ref, output_ids, prompt, *penalties)
    assert int((out != ref).sum()) == 0
    assert int((out != logits).sum()) > 20 * BATCH  # about 100 penalized tokens per row


def filter_params():
    """Per-row temperature, top-k, top-p and min-p from realistic mixes; some rows use none of them."""
    g = torch.Generator().manual_seed(11)

    def pick(options):
        return torch.tensor(options)[torch.randint(0, len(options), (BATCH,), generator=g)]

    top_k = pick([VOCAB, VOCAB, 1, 20, 50, 1000, 40000])
    top_p = pick([1.0, 1.0, 0.5, 0.9, 0.95, 0.99, 1e-6]).float()
    min_p = pick([0.0, 0.0, 0.0, 0.05, 0.1]).float()
    temperature = 0.5 + torch.rand(BATCH, generator=g)
    return [t.cuda() for t in (temperature, top_k, top_p, min_p)]


@pytest.mark.parametrize("ties", [False, True], ids=["random-logits", "bf16-valued-logits"])
def test_apply_sampling_filters_keep_the_reference_tokens(ties):
    """Temperature + top-k + top-p + min-p on 256 x 128 256 fp32 logits (row scales 1 to 6; bf16-valued logits for
    many ties): the kept token sets equal the fp32 reference's (a row may differ only where the kernel agrees
    with an fp64 reference, at most 8 rows), and the kept values are identical."""
    params = filter_params()
    scales = 1.0 + 5.0 * torch.rand(BATCH, 1, generator=torch.Generator(device="cuda").manual_seed(12), device="cuda")
    logits = randn(BATCH, VOCAB, seed=13) * scales
    if ties:
        logits = logits.bfloat16().float()
    out, ref = torch.full_like(logits, float("nan")), torch.empty_like(logits)
    torch.ops.graphserve.apply_sampling_filters(out, logits, *params)
    get_op("apply_sampling_filters").reference(ref, logits, *params)
    kept, kept_ref = out.isfinite(), ref.isfinite()
    assert not torch.isnan(out).any()
    assert torch.equal(out[kept & kept_ref], ref[kept & kept_ref])
    differing = (kept != kept_ref).any(-1).nonzero().flatten().tolist()
    assert len(differing) <= 8, f"{len(differing)} rows keep other tokens than the reference"
    for row in differing:
        ref64 = torch.empty(1, VOCAB, dtype=torch.float64, device="cuda")
        get_op("apply_sampling_filters").reference(ref64, logits[row:row + 1].double(),
                                                   *[p[row:row + 1] for p in params])
        assert torch.equal(kept[row], ref64.isfinite()[0]), f"row {row} differs from the fp32 and fp64 references"
    assert int(kept.sum()) < kept.numel()  # the filters removed something
