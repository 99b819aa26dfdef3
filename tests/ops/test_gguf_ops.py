"""GGUF quant types kept in their blocks: the torch references decode exactly what the `gguf` package decodes (its
own quantizer where it has one, random blocks of the layout elsewhere), the Triton kernels (interpreter, CPU
tensors) match the references, and an unsupported type is named."""
import gguf
import numpy as np
import pytest
import torch

from graphserve.ops import gguf as gguf_ops

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # the gguf package quantizes these
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # it only dequantizes these
FLOATS = ["F32", "F16", "BF16"]


def _qtype(name: str) -> int:
    return gguf_ops.GGML_TYPE_IDS[name]


def quantized(name: str, n: int, k: int, seed: int) -> torch.Tensor:
    """[n, row_bytes] uint8 blocks of type `name`: random weights through the gguf quantizer, or (K-quants) random
    bytes with finite, small fp16 scales."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[name]
    if name in LEGACY or name in FLOATS:
        weights = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
        if name == "F32":
            return torch.from_numpy(weights.view(np.uint8).copy())
        if name == "F16":
            return torch.from_numpy(weights.astype(np.float16).view(np.uint8).copy())
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weights, qtype)))
    _, block, size = gguf_ops.GGML_TYPES[_qtype(name)]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for offset in gguf_ops.FP16_FIELD_OFFSETS[name]:
        scale = (rng.random((raw.shape[0], 1)) * 0.02 + 1e-3).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def gguf_package_dequantize(name: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    array = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(blocks.shape[0], k)


@pytest.mark.parametrize("name", LEGACY + K_QUANTS + FLOATS)
def test_reference_decodes_like_the_gguf_package(name):
    k = 512  # two K-quant super-blocks, sixteen legacy blocks
    blocks = quantized(name, 6, k, seed=len(name))
    ours = gguf_ops.dequantize_ref(blocks, _qtype(name), k)
    assert torch.equal(ours, gguf_package_dequantize(name, blocks, k))
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_quantizer_round_trip_is_close(name):
    """The gguf quantizer's blocks decode to weights within one quantization step of the originals."""
    rng = np.random.default_rng(3)
    weights = (rng.standard_normal((4, 256)) * 0.1).astype(np.float32)
    blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weights, gguf.GGMLQuantizationType[name])))
    decoded = gguf_ops.dequantize_ref(blocks, _qtype(name), 256)
    step = np.abs(weights).max() / (127 if name == "Q8_0" else 7)
    assert (decoded - torch.from_numpy(weights)).abs().max() <= step


def test_row_bytes_and_unsupported_types():
    assert gguf_ops.row_bytes(_qtype("Q4_K"), 512) == 2 * 144
    assert gguf_ops.row_bytes(_qtype("Q8_0"), 64) == 2 * 34
    with pytest.raises(ValueError, match="Q4_K blocks of 256"):
        gguf_ops.row_bytes(_qtype("Q4_K"), 64)
    iq2 = int(gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(ValueError, match=f"GGUF quant type {iq2} is not supported"):
        gguf_ops.row_bytes(iq2, 256)
    with pytest.raises(ValueError, match="take 68 bytes, not 60"):
        gguf_ops.dequantize_ref(torch.zeros(2, 60, dtype=torch.uint8), _qtype("Q8_0"), 64)


@pytest.mark.parametrize("name", LEGACY + K_QUANTS + FLOATS)
def test_ops_dispatch_to_the_reference(name):
    k, n = 256, 5
    blocks = quantized(name, n, k, seed=7)
    dense = gguf_ops.dequantize_ref(blocks, _qtype(name), k)
    x = torch.randn(3, k)
    torch.testing.assert_close(gguf_ops.gguf_gemm(x, blocks, _qtype(name)), x @ dense.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(gguf_ops.gguf_dequantize(blocks, _qtype(name), k, torch.float32), dense)
    torch.library.opcheck(torch.ops.graphserve.gguf_gemm.default,
                          (torch.empty(3, n), x, blocks, _qtype(name)))


@pytest.mark.parametrize("name", LEGACY + K_QUANTS + FLOATS)
def test_triton_kernels_match_the_reference(name):
    from graphserve.ops.triton import gguf as triton_gguf

    k, n = 512, 40  # n not a multiple of the kernels' column tiles
    blocks = quantized(name, n, k, seed=11)
    dense = gguf_ops.dequantize_ref(blocks, _qtype(name), k)
    out = torch.empty(n, k)
    triton_gguf.gguf_dequantize(out, blocks, _qtype(name))
    assert torch.equal(out, dense)
    g = torch.Generator().manual_seed(k)
    for m in (1, 3, 20):  # GEMV, GEMV with rows, tl.dot tiles
        x = torch.randn(m, k, generator=g)
        got = torch.empty(m, n)
        triton_gguf.gguf_gemm(got, x, blocks, _qtype(name))
        ref = x @ dense.t()
        # fp32 sums in another order: relative to the output's norm (single outputs may cancel to near zero)
        assert ((got - ref).norm() / ref.norm()) < 1e-6, f"m={m}"


def test_triton_gemm_in_half_precision():
    from graphserve.ops.triton import gguf as triton_gguf

    blocks = quantized("Q4_K", 24, 256, seed=5)
    dense = gguf_ops.dequantize_ref(blocks, _qtype("Q4_K"), 256)
    for m in (2, 17):
        x = torch.randn(m, 256).half()
        got = torch.empty(m, 24, dtype=torch.float16)
        triton_gguf.gguf_gemm(got, x, blocks, _qtype("Q4_K"))
        ref = x.float() @ dense.t()
        assert ((got.float() - ref).norm() / ref.norm()) < 2e-3
