"""Quantized GEMM ops: the torch references against a from-the-definition dequantization, the Triton kernels
against the references (interpreter, CPU tensors, fp32 / fp16), schemas and fakes through opcheck."""
import pytest
import torch

from graphserve.ops import quant as quant_ops

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _codes_layout(bits: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes [K, N] and their engine layout [K * bits / 32, N], packed here field by field."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.int64)
    per_word = 32 // bits
    words = torch.zeros(k // per_word, n, dtype=torch.int64)
    for i in range(per_word):
        words |= codes[i::per_word] << (bits * i)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return codes, words


def _grouped(bits: int, k: int, n: int, group_size: int, seed: int):
    codes, qweight = _codes_layout(bits, k, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    groups = k // group_size
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 0.005).half()
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=g).half()
    dense = (codes.float() - zeros.float().repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(
        group_size, 0)
    return qweight, scales, zeros, dense


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k,n,group_size", [(64, 24, 32), (96, 1, 96), (128, 40, 64)])
def test_reference_dequantizes_by_the_definition(bits, k, n, group_size):
    qweight, scales, zeros, dense = _grouped(bits, k, n, group_size, seed=bits + k)
    assert torch.equal(quant_ops.dequantize_ref(qweight, scales, zeros, bits, group_size), dense)
    x = torch.randn(3, k)
    out = torch.empty(3, n)
    torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, bits, group_size)
    torch.testing.assert_close(out, x @ dense)


def test_squeezellm_reference_reads_each_columns_table():
    codes, qweight = _codes_layout(4, 40, 9, seed=3)
    table = torch.randn(9, 16)
    x = torch.randn(2, 40)
    out = torch.empty(2, 9)
    torch.ops.graphserve.squeezellm_gemm(out, x, qweight, table)
    dense = torch.stack([table[n, codes[:, n]] for n in range(9)], dim=1)  # [K, N]
    torch.testing.assert_close(out, x @ dense)


def test_bf16_activations_beyond_fp16_range_stay_finite():
    """AWQ kernels that cast activations to fp16 printed "!!!!" for bf16 models (vLLM #1114): here the product is
    taken in the activations' own dtype (the reference in fp32), so values past fp16's 65504 survive."""
    qweight, scales, zeros, dense = _grouped(4, 64, 16, 32, seed=4)
    x = torch.full((2, 64), 3e5).to(torch.bfloat16)
    out = torch.empty(2, 16, dtype=torch.bfloat16)
    torch.ops.graphserve.quant_gemm(out, x, qweight, scales, zeros, 4, 32)
    assert torch.isfinite(out).all() and out.float().abs().max() > 65504
    torch.testing.assert_close(out.float(), x.float() @ dense, rtol=1e-2, atol=0)


def test_ops_pass_opcheck():
    qweight, scales, zeros, _ = _grouped(4, 64, 16, 32, seed=0)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.graphserve.quant_gemm.default,
                          (torch.empty(3, 16), x, qweight, scales, zeros, 4, 32))
    torch.library.opcheck(torch.ops.graphserve.quant_dequantize.default,
                          (torch.empty(64, 16), qweight, scales, zeros, 4, 32))
    torch.library.opcheck(torch.ops.graphserve.squeezellm_gemm.default,
                          (torch.empty(3, 16), x, qweight, torch.randn(16, 16)))


triton_quant = pytest.importorskip("graphserve.ops.triton.quant")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m,k,n,group_size", [
    (1, 64, 24, 32),  # decode row, N not a multiple of the 32-wide tile
    (5, 96, 1, 96),  # N = 1, one group over K = 96 (group -1): 32-row K steps
    (17, 128, 40, 64),  # M just over the decode tile
    (70, 64, 16, 64),  # the large-tile path
])
def test_triton_gemm_matches_reference(dtype, bits, m, k, n, group_size):
    qweight, scales, zeros, _ = _grouped(bits, k, n, group_size, seed=m + k + bits)
    x = torch.randn(m, k).to(dtype)
    ref, out = torch.empty(m, n, dtype=dtype), torch.full((m, n), float("nan"), dtype=dtype)
    quant_ops._quant_gemm_ref(ref, x, qweight, scales, zeros, bits, group_size)
    triton_quant.quant_gemm(out, x, qweight, scales, zeros, bits, group_size)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < TOL[dtype]


@pytest.mark.parametrize("config", [
    dict(kernel="gemv", block_n=16, split_k=1, block_r=4),
    dict(kernel="gemv", block_n=16, split_k=3, block_r=2),  # uneven splits: some programs get no K step
    dict(kernel="gemv", block_n=32, split_k=16, block_r=8),  # more splits than steps: capped
    dict(kernel="dot", block_n=16, split_k=1, block_m=16, block_k=32),
    dict(kernel="dot", block_n=16, split_k=3, block_m=16, block_k=32),
    dict(kernel="dot", block_n=16, split_k=1, block_m=128, block_k=32),
], ids=lambda c: f"{c['kernel']}{c.get('block_m', '')}-split{c['split_k']}")
@pytest.mark.parametrize("m,k,n,group_size", [
    (1, 256, 40, 64),
    (3, 192, 24, 32),
    (4, 160, 17, 160),  # one group (group -1) over a K that is not a multiple of the step
])
def test_triton_each_kernel_and_split_matches_reference(config, m, k, n, group_size):
    """Both kernels (the GEMV on one row), with and without the split-K reduction, are exact up to fp32 rounding;
    a second call reuses the tile counters the first left at zero."""
    bits = 4
    m = 1 if config["kernel"] == "gemv" else m
    qweight, scales, zeros, _ = _grouped(bits, k, n, group_size, seed=m + k)
    ref = torch.empty(m, n)
    for _ in range(2):
        x = torch.randn(m, k)
        quant_ops._quant_gemm_ref(ref, x, qweight, scales, zeros, bits, group_size)
        out = torch.full((m, n), float("nan"))
        triton_quant.launch(out, x, qweight, scales, zeros, bits, group_size, triton_quant.GemmConfig(**config))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not triton_quant.split_k_buffers(1, 1, 2, x.device)[1].any()  # counters back at zero


def test_triton_config_choice_by_batch_size():
    """Decode rows take the GEMV, split along K when the output alone has too few tiles; larger batches the tiled
    kernel with a K step inside one group; the GEMV's step also stays inside one group."""
    device = torch.device("cpu")
    decode = triton_quant.choose_config(1, 64, 4096, 4, 128, device)
    assert decode.kernel == "gemv" and decode.split_k > 1 and decode.block_r * 8 <= 128
    assert triton_quant.choose_config(1, 64, 4096, 4, 32, device).block_r == 4
    assert triton_quant.choose_config(1, 64, 4096, 8, 32, device).block_r == 8
    wide = triton_quant.choose_config(1, 1 << 16, 4096, 4, 128, device)
    assert wide.split_k == 1
    batch = triton_quant.choose_config(48, 4096, 4096, 4, 32, device)
    assert batch.kernel == "dot" and batch.block_k == 32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_dequantize_is_exact(bits):
    qweight, scales, zeros, dense = _grouped(bits, 128, 40, 32, seed=bits)
    out = torch.empty(128, 40)
    triton_quant.quant_dequantize(out, qweight, scales, zeros, bits, 32)
    assert torch.equal(out, dense)


def test_triton_dense_path_for_large_batches(monkeypatch):
    """Above DENSE_GEMM_MIN_ROWS rows the kernel dequantizes once into a kept scratch buffer and calls the dense
    GEMM; a smaller layer reuses the buffer, a larger one replaces it."""
    monkeypatch.setattr(triton_quant, "DENSE_GEMM_MIN_ROWS", 8)
    monkeypatch.setattr(triton_quant, "_dense_scratch", {})
    for k, n in [(64, 24), (32, 24), (96, 40)]:
        qweight, scales, zeros, dense = _grouped(4, k, n, 32, seed=9 + k)
        x = torch.randn(9, k)
        out = torch.empty(9, n)
        triton_quant.quant_gemm(out, x, qweight, scales, zeros, 4, 32)
        torch.testing.assert_close(out, x @ dense)
        buffers = list(triton_quant._dense_scratch.values())
        assert len(buffers) == 1 and buffers[0].numel() == max(64 * 24, k * n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 24), (7, 40, 16), (20, 136, 33)])  # K not a multiple of the K step
def test_triton_squeezellm_matches_reference(dtype, m, k, n):
    _, qweight = _codes_layout(4, k, n, seed=k)
    table = torch.randn(n, 16).to(dtype)
    x = torch.randn(m, k).to(dtype)
    ref, out = torch.empty(m, n, dtype=dtype), torch.full((m, n), float("nan"), dtype=dtype)
    quant_ops._squeezellm_gemm_ref(ref, x, qweight, table)
    triton_quant.squeezellm_gemm(out, x, qweight, table)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < TOL[dtype]


def test_triton_refuses_a_transposed_weight():
    qweight, scales, zeros, _ = _grouped(4, 64, 16, 32, seed=1)
    with pytest.raises(ValueError, match="row-major"):
        triton_quant.quant_gemm(torch.empty(1, 16), torch.randn(1, 64), qweight.t().contiguous().t(), scales, zeros,
                                4, 32)
