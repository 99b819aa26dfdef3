"""Tests of the quantized-checkpoint oracle (tests/quantization/quant_testutils.py) against formats.md sections 1-3
and Appendix B: the packers are checked against independently written reference unpackers, fixed bit vectors, and
(when GPTQModel is installed) against GPTQModel's own CPU unpackers."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.quantization.quant_testutils import (
    AWQ_REVERSE_ORDER,
    GPTQ_V1_TO_V2_WORD_OFFSET,
    LINEAR_PROJECTIONS,
    REMOVE,
    dequantize_awq,
    dequantize_gptq,
    dequantize_squeezellm,
    drop_tensor,
    load_checkpoint_tensors,
    pack_awq,
    pack_gptq,
    pack_squeezellm,
    quant_config_location,
    quantize_awq,
    quantize_gptq,
    quantize_squeezellm,
    reference_dequantize_checkpoint,
    reference_model,
    set_quant_field,
    truncate_tensor,
    write_quantized_checkpoint,
)

U32 = 0xFFFFFFFF


def u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & U32


def rand_w(n, k, seed=0, scale=0.1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


def shapes(tensors):
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# Appendix B vectors and bit layouts


def test_awq_pack_of_columns_0_to_7_is_0x75316420():
    codes = torch.arange(8)[None, :]                            # K=1 row, logical columns 0..7
    tensors, deq = pack_awq(codes, codes, torch.ones(1, 8))
    assert u32(tensors["qweight"]).tolist() == [[0x75316420]]
    assert u32(tensors["qzeros"]).tolist() == [[0x75316420]]
    assert torch.equal(deq, torch.zeros(8, 1))
    assert dequantize_awq(
        {**tensors, "qzeros": torch.zeros(1, 1, dtype=torch.int32)}, -1).flatten().tolist() == list(range(8))


@pytest.mark.parametrize("j", range(8))
def test_awq_unpack_shift_of_column_j(j):
    codes = torch.zeros(1, 8, dtype=torch.int64)
    codes[0, j] = 0xF
    tensors, _ = pack_awq(codes, torch.zeros(1, 8), torch.ones(1, 8))
    shift = 4 * [0, 4, 1, 5, 2, 6, 3, 7][j]
    assert 4 * AWQ_REVERSE_ORDER[j] == shift
    assert u32(tensors["qweight"]).item() == 0xF << shift


def test_gptq_pack_of_rows_0_to_7_is_0x76543210():
    codes = torch.arange(8)[:, None].repeat(1, 8)              # K=8 input rows holding 0..7, N=8
    tensors, _ = pack_gptq(codes, torch.full((1, 8), 8), torch.ones(1, 8), torch.zeros(8), 4, "gptq_v2")
    assert u32(tensors["qweight"]).tolist() == [[0x76543210] * 8]
    assert dequantize_gptq(tensors, 4, -1, "gptq_v2")[0].tolist() == [float(v - 8) for v in range(8)]


@pytest.mark.parametrize("bits,v1,v2", [(4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080),
                                        (2, 0x55555555, 0xAAAAAAAA)])
def test_gptq_sym_qzeros_words(bits, v1, v2):
    w = rand_w(32, 64)
    t1, d1 = quantize_gptq(w, bits, 32, sym=True, checkpoint_format="gptq")
    t2, d2 = quantize_gptq(w, bits, 32, sym=True, checkpoint_format="gptq_v2")
    assert (u32(t1["qzeros"]) == v1).all() and (u32(t2["qzeros"]) == v2).all()
    assert torch.equal(d1, d2)
    if bits == 4:
        assert (t1["qzeros"] == 2004318071).all()


@pytest.mark.parametrize("j,words", [
    (0, [0x7, 0, 0]), (9, [0x7 << 27, 0, 0]),
    (10, [0x3 << 30, 0x1, 0]),                                  # low 2 bits end word0, bit 2 starts word1
    (11, [0, 0x7 << 1, 0]), (20, [0, 0x7 << 28, 0]),
    (21, [0, 0x1 << 31, 0x3]),                                  # low bit ends word1, bits 1-2 start word2
    (22, [0, 0, 0x7 << 2]), (31, [0, 0, 0x7 << 29]),
])
def test_gptq_3bit_layout(j, words):
    codes = torch.zeros(32, 32, dtype=torch.int64)
    codes[j, :] = 7
    tensors, _ = pack_gptq(codes, torch.full((1, 32), 4), torch.ones(1, 32), torch.zeros(32), 3, "gptq_v2")
    assert tensors["qweight"].shape == (3, 32)
    assert u32(tensors["qweight"][:, 0]).tolist() == words
    # the same layout along N for qzeros: logical zero 7 in column j only
    zeros = torch.zeros(1, 32, dtype=torch.int64)
    zeros[0, j] = 7
    tensors, _ = pack_gptq(torch.zeros(32, 32), zeros, torch.ones(1, 32), torch.zeros(32), 3, "gptq_v2")
    assert tensors["qzeros"].shape == (1, 3)
    assert u32(tensors["qzeros"][0]).tolist() == words


def test_squeezellm_indices_pack_sequentially_along_k():
    idx = torch.arange(8)[None, :].repeat(8, 1)                 # N=8 rows, input k holds index k
    lut = torch.arange(16, dtype=torch.float32)[None, :].repeat(8, 1) / 4
    tensors, deq = pack_squeezellm(idx, lut)
    assert u32(tensors["qweight"]).tolist() == [[0x76543210] * 8]
    assert torch.equal(deq, idx.float() / 4)
    assert torch.equal(dequantize_squeezellm(tensors), deq)


# ---------------------------------------------------------------------------------------------------------------
# AWQ


@pytest.mark.parametrize("n,k,g", [(64, 64, 32), (40, 64, -1), (24, 128, 64), (128, 128, 128)])
def test_awq_round_trip(n, k, g):
    w = rand_w(n, k, seed=n + k)
    tensors, deq = quantize_awq(w, group_size=g)
    groups = 1 if g == -1 else k // g
    assert shapes(tensors) == {"qweight": (torch.int32, (k, n // 8)), "qzeros": (torch.int32, (groups, n // 8)),
                               "scales": (torch.float16, (groups, n))}
    assert deq.dtype == torch.float32 and deq.shape == (n, k)
    assert torch.equal(dequantize_awq(tensors, g), deq)
    s = tensors["scales"].float().repeat_interleave(k // groups, dim=0).T          # [N, K]
    assert ((deq - w).abs() <= 1.01 * s).all()
    assert (deq != w).any()


def test_awq_pack_random_codes_matches_formula():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 24), generator=gen)
    z = torch.randint(0, 16, (2, 24), generator=gen)
    s = (torch.rand(2, 24, generator=gen) + 0.01).half()
    tensors, deq = pack_awq(q, z, s)
    expect = ((q - z.repeat_interleave(32, 0)).float() * s.float().repeat_interleave(32, 0)).T
    assert torch.equal(deq, expect)
    assert torch.equal(dequantize_awq(tensors, 32), expect)


def test_awq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="K % group_size"):
        quantize_awq(rand_w(64, 96), group_size=64)
    with pytest.raises(ValueError, match="N % 8"):
        quantize_awq(rand_w(60, 64), group_size=32)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_awq(torch.full((8, 8), 16), torch.zeros(1, 8), torch.ones(1, 8))


# ---------------------------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_round_trip(bits, sym, fmt, desc_act):
    n, k, g = 32, 64, 16
    w = rand_w(n, k, seed=bits)
    tensors, deq = quantize_gptq(w, bits, g, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    assert shapes(tensors) == {"qweight": (torch.int32, (k * bits // 32, n)),
                               "qzeros": (torch.int32, (k // g, n * bits // 32)),
                               "scales": (torch.float16, (k // g, n)), "g_idx": (torch.int32, (k,))}
    assert deq.dtype == torch.float32 and deq.shape == (n, k)
    assert torch.equal(dequantize_gptq(tensors, bits, g, fmt), deq)
    s = tensors["scales"].float()[tensors["g_idx"].long()].T                     # scale of each (n, k), via g_idx
    assert ((deq - w).abs() <= 1.01 * s + 1e-7).all()                            # rows stay in original order


def test_gptq_desc_act_g_idx():
    w = rand_w(32, 128)
    tensors, deq = quantize_gptq(w, 4, 32, desc_act=True, seed=3)
    g_idx = tensors["g_idx"].long()
    assert (g_idx.diff() < 0).any(), "act-order g_idx must be non-monotonic"
    assert torch.bincount(g_idx).tolist() == [32] * 4
    again, _ = quantize_gptq(w, 4, 32, desc_act=True, seed=3)
    other, _ = quantize_gptq(w, 4, 32, desc_act=True, seed=4)
    assert torch.equal(again["g_idx"], tensors["g_idx"]) and not torch.equal(other["g_idx"], tensors["g_idx"])
    # assuming k // G instead of honouring g_idx gives a different (wrong) matrix
    wrong = dequantize_gptq({**tensors, "g_idx": None}, 4, 32, "gptq")
    assert not torch.equal(wrong, deq)
    plain, _ = quantize_gptq(w, 4, 32)
    assert plain["g_idx"].tolist() == [i // 32 for i in range(128)]


def test_gptq_group_minus_one_and_ragged_groups():
    w = rand_w(32, 64)
    for desc_act in (False, True):
        tensors, deq = quantize_gptq(w, 4, -1, desc_act=desc_act)
        assert tensors["scales"].shape == (1, 32) and tensors["qzeros"].shape == (1, 4)
        assert (tensors["g_idx"] == 0).all()
        assert torch.equal(dequantize_gptq(tensors, 4, -1, "gptq"), deq)
    tensors, deq = quantize_gptq(w, 4, 48)                                        # ceil(64 / 48) = 2 groups
    assert tensors["scales"].shape == (2, 32) and tensors["g_idx"].tolist() == [i // 48 for i in range(64)]
    assert torch.equal(dequantize_gptq(tensors, 4, 48, "gptq"), deq)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_v2_equivalence(bits, sym):
    w = rand_w(64, 64, seed=7)
    t1, d1 = quantize_gptq(w, bits, 32, sym=sym, checkpoint_format="gptq")
    t2, d2 = quantize_gptq(w, bits, 32, sym=sym, checkpoint_format="gptq_v2", min_zero=1 if not sym else None)
    assert torch.equal(d1, d2)
    for name in ("qweight", "scales", "g_idx"):
        assert torch.equal(t1[name], t2[name])
    assert not torch.equal(t1["qzeros"], t2["qzeros"])
    if bits in GPTQ_V1_TO_V2_WORD_OFFSET:                       # GPTQModel's whole-word conversion
        assert torch.equal((u32(t1["qzeros"]) + GPTQ_V1_TO_V2_WORD_OFFSET[bits]) & U32, u32(t2["qzeros"]))
    # decoding v1 bytes as v2 (a loader ignoring checkpoint_format) is off by one zero step everywhere
    s = t1["scales"].float()[t1["g_idx"].long()].T
    assert torch.allclose(dequantize_gptq(t1, bits, 32, "gptq_v2") - d1, s)


def test_gptq_3bit_explicit_logical_zeros_v1_equals_v2():
    n, k = 64, 64                                               # N not a multiple of 64; 3-bit needs N % 32 == 0
    gen = torch.Generator().manual_seed(5)
    zeros = torch.tensor([[1 + (3 * j + 1) % 7 for j in range(n)], [1 + (5 * j + 2) % 7 for j in range(n)]])
    codes = torch.randint(0, 8, (k, n), generator=gen)
    scales = (torch.rand(2, n, generator=gen) + 0.05).half()
    g_idx = torch.arange(k) // 32
    t1, d1 = pack_gptq(codes, zeros, scales, g_idx, 3, "gptq")
    t2, d2 = pack_gptq(codes, zeros, scales, g_idx, 3, "gptq_v2")
    expect = ((codes - zeros[g_idx]).float() * scales.float()[g_idx]).T
    assert torch.equal(d1, expect) and torch.equal(d2, expect)
    assert torch.equal(dequantize_gptq(t1, 3, 32, "gptq"), expect)
    assert torch.equal(dequantize_gptq(t2, 3, 32, "gptq_v2"), expect)
    assert t1["qzeros"].shape == (2, 6) and t1["qweight"].shape == (6, n)


def test_gptq_3bit_shape_rules():
    tensors, deq = quantize_gptq(rand_w(32, 64), 3, 32)
    assert tensors["qweight"].shape == (6, 32) and tensors["qzeros"].shape == (2, 3)
    with pytest.raises(ValueError, match="qzeros"):
        quantize_gptq(rand_w(40, 64), 3, 32)                    # 40 * 3 % 32 != 0
    with pytest.raises(ValueError, match="qweight"):
        quantize_gptq(rand_w(32, 48), 3, 16)                    # 48 * 3 % 32 != 0
    with pytest.raises(ValueError, match="qzeros"):
        quantize_gptq(rand_w(8, 64), 2, 32)                     # 2-bit qzeros needs N % 16 == 0


def test_gptq_rejects_bad_arguments():
    w = rand_w(32, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize_gptq(w, 5, 32)
    with pytest.raises(ValueError, match="checkpoint_format"):
        quantize_gptq(w, 4, 32, checkpoint_format="marlin")
    with pytest.raises(ValueError, match="group_size"):
        quantize_gptq(w, 4, 0)


def _nonneg_group_weight():
    w = rand_w(32, 64, seed=11)
    w[:, :32] = w[:, :32].abs() + 0.01                          # group 0 all positive: the ideal asym zero is 0
    return w


def test_gptq_asym_v1_never_stores_zero_minus_one():
    w = _nonneg_group_weight()
    t2_free, d2_free = quantize_gptq(w, 4, 32, sym=False, checkpoint_format="gptq_v2")
    t1, d1 = quantize_gptq(w, 4, 32, sym=False, checkpoint_format="gptq")
    t2, d2 = quantize_gptq(w, 4, 32, sym=False, checkpoint_format="gptq_v2", min_zero=1)
    assert (u32(t2_free["qzeros"][0]) == 0).all()                # v2 can store zero 0 ...
    assert (u32(t1["qzeros"][0]) == 0).all()                     # ... v1 stores 1 - 1 = 0 (clamped), no underflow
    assert torch.equal(d1, d2) and not torch.equal(d1, d2_free)
    assert torch.equal((u32(t1["qzeros"]) + 0x11111111) & U32, u32(t2["qzeros"]))
    assert torch.equal(dequantize_gptq(t1, 4, 32, "gptq"), d1)


def test_gptq_v1_underflow_case_is_lossy():
    w = _nonneg_group_weight()
    t1, d1 = quantize_gptq(w, 4, 32, sym=False, checkpoint_format="gptq", min_zero=0)
    t2, d2 = quantize_gptq(w, 4, 32, sym=False, checkpoint_format="gptq_v2")
    assert (u32(t1["qzeros"][0]) == U32).all()                   # -1 OR-ed in: every field of the word is 0xF
    assert torch.equal(t1["qweight"], t2["qweight"])
    assert torch.equal(dequantize_gptq(t1, 4, 32, "gptq"), d1)   # `dequantized` = what the v1 decoder reads
    assert torch.equal(d1[:, 32:], d2[:, 32:])                   # group 1 is intact ...
    assert not torch.equal(d1[:, :32], d2[:, :32])               # ... group 0 decodes with zero 16, not 0


# ---------------------------------------------------------------------------------------------------------------
# SqueezeLLM


def test_squeezellm_round_trip_and_lut():
    n, k = 48, 64
    w = rand_w(n, k, seed=2)
    tensors, deq = quantize_squeezellm(w)
    assert shapes(tensors) == {"qweight": (torch.int32, (k // 8, n)), "lookup_table": (torch.float16, (n, 16))}
    assert deq.dtype == torch.float32 and deq.shape == (n, k)
    assert torch.equal(dequantize_squeezellm(tensors), deq)
    lut = tensors["lookup_table"].float()
    assert (lut.diff(dim=1) >= 0).all()
    steps = lut.diff(dim=1)
    assert (steps.amax(dim=1) > 2 * steps.amin(dim=1)).all(), "LUT must be non-uniform"
    assert not torch.equal(lut[0], lut[1]), "one LUT per output channel"
    assert all(set(deq[r].tolist()) <= set(lut[r].tolist()) for r in range(n))
    assert ((deq - w).abs().amax(dim=1) < (w.amax(dim=1) - w.amin(dim=1)) / 4).all()
    again, deq32 = quantize_squeezellm(w, lut_dtype=torch.float32)
    assert again["lookup_table"].dtype == torch.float32 and torch.equal(deq32, deq)
    assert torch.equal(again["qweight"], tensors["qweight"])
    with pytest.raises(ValueError, match="K % 8"):
        quantize_squeezellm(rand_w(8, 60))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _proj_names(model, layers=2):
    return {f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
            for i in range(layers) for p in LINEAR_PROJECTIONS}


def _check_checkpoint(src, dst, reference, suffixes):
    src_t, dst_t = load_checkpoint_tensors(src), load_checkpoint_tensors(dst)
    prefixes = {name[: -len(".weight")] for name in reference}
    assert len(prefixes) == 14
    for prefix in prefixes:
        assert f"{prefix}.weight" not in dst_t
        assert {name for name in dst_t if name.startswith(prefix + ".")} - {f"{prefix}.bias"} == {
            f"{prefix}.{s}" for s in suffixes}
        assert reference[f"{prefix}.weight"].shape == src_t[f"{prefix}.weight"].shape
        assert reference[f"{prefix}.weight"].dtype == torch.float32
    for name, t in src_t.items():
        if name not in reference:
            assert torch.equal(dst_t[name], t) and dst_t[name].dtype == t.dtype, name
    for entry in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(dst, entry))
    assert reference_dequantize_checkpoint(dst).keys() == reference.keys()
    for name, t in reference_dequantize_checkpoint(dst).items():
        assert torch.equal(t, reference[name]), name


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_awq_checkpoint(tiny_model, tmp_path):
    src, model = tiny_model("llama")
    reference = write_quantized_checkpoint(src, str(tmp_path), "awq", group_size=32)
    assert {name[: -len(".weight")] for name in reference} == _proj_names(model)
    _check_checkpoint(src, str(tmp_path), reference, ("qweight", "qzeros", "scales"))
    assert _config(tmp_path)["quantization_config"] == {"quant_method": "awq", "zero_point": True, "group_size": 32,
                                                        "bits": 4, "version": "gemm", "modules_to_not_convert": None}
    assert not os.path.exists(tmp_path / "quant_config.json")
    gate = load_checkpoint_tensors(str(tmp_path))["model.layers.0.mlp.gate_proj.qweight"]
    assert gate.shape == (64, 16) and gate.dtype == torch.int32


def test_awq_legacy_config_file(tiny_model, tmp_path):
    src, _ = tiny_model("llama")
    reference = write_quantized_checkpoint(src, str(tmp_path), "awq", group_size=-1, legacy_config_file=True)
    assert "quantization_config" not in _config(tmp_path)
    with open(tmp_path / "quant_config.json") as f:
        assert json.load(f) == {"zero_point": True, "q_group_size": -1, "w_bit": 4, "version": "GEMM"}
    _check_checkpoint(src, str(tmp_path), reference, ("qweight", "qzeros", "scales"))


@pytest.mark.parametrize("bits,group_size,sym,desc_act,fmt,legacy", [
    (4, 32, True, False, "gptq", False),
    (3, -1, False, True, "gptq_v2", False),
    (8, 32, False, True, "gptq", True),
])
def test_gptq_checkpoint(tiny_model, tmp_path, bits, group_size, sym, desc_act, fmt, legacy):
    src, _ = tiny_model("llama")
    reference = write_quantized_checkpoint(src, str(tmp_path), "gptq", bits=bits, group_size=group_size, sym=sym,
                                           desc_act=desc_act, checkpoint_format=fmt, legacy_config_file=legacy)
    _check_checkpoint(src, str(tmp_path), reference, ("qweight", "qzeros", "scales", "g_idx"))
    expected = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "quant_method": "gptq",
                "checkpoint_format": fmt}
    config = _config(tmp_path)
    if legacy:
        assert "quantization_config" not in config
        with open(tmp_path / "quantize_config.json") as f:
            cfg = json.load(f)
    else:
        assert not os.path.exists(tmp_path / "quantize_config.json")
        cfg = config["quantization_config"]
    assert cfg.items() >= expected.items()
    tensors = load_checkpoint_tensors(str(tmp_path))
    down = tensors["model.layers.1.mlp.down_proj.qweight"]
    assert down.shape == (128 * bits // 32, 64)
    if desc_act and group_size != -1:
        def g_idx(layer, module):
            return tensors[f"model.layers.{layer}.{module}.g_idx"]

        q0 = g_idx(0, "self_attn.q_proj")
        assert (q0.diff() < 0).any() and not torch.equal(q0, g_idx(1, "self_attn.q_proj")), "one act order per layer"
        # projections reading the same input share GPTQ's Hessian, hence one act order
        assert torch.equal(q0, g_idx(0, "self_attn.k_proj")) and torch.equal(q0, g_idx(0, "self_attn.v_proj"))
        assert torch.equal(g_idx(1, "mlp.gate_proj"), g_idx(1, "mlp.up_proj"))
        assert not torch.equal(q0, g_idx(0, "self_attn.o_proj")) and not torch.equal(q0, g_idx(0, "mlp.gate_proj"))


def test_qwen2_biases_are_kept(tiny_model, tmp_path):
    src, model = tiny_model("qwen2")
    reference = write_quantized_checkpoint(src, str(tmp_path), "gptq", bits=4, group_size=32, desc_act=True)
    _check_checkpoint(src, str(tmp_path), reference, ("qweight", "qzeros", "scales", "g_idx"))
    tensors = load_checkpoint_tensors(str(tmp_path))
    for proj in ("q_proj", "k_proj", "v_proj"):
        bias = tensors[f"model.layers.0.self_attn.{proj}.bias"]
        assert torch.equal(bias, getattr(model.model.layers[0].self_attn, proj).bias.detach())


def test_squeezellm_checkpoint(tiny_model, tmp_path):
    src, _ = tiny_model("llama")
    reference = write_quantized_checkpoint(src, str(tmp_path), "squeezellm")
    _check_checkpoint(src, str(tmp_path), reference, ("qweight", "lookup_table"))
    assert "quantization_config" not in _config(tmp_path)
    with open(tmp_path / "quant_config.json") as f:
        assert json.load(f) == {"wbits": 4}


def test_reference_model_generates(tiny_model, tmp_path):
    src, model = tiny_model("llama")
    reference = write_quantized_checkpoint(src, str(tmp_path), "awq", group_size=32)
    ref = reference_model(model, reference)
    assert ref is not model
    assert torch.equal(ref.model.layers[1].mlp.down_proj.weight, reference["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
        out = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    assert out.shape == (1, 10) and torch.equal(out[:, :6], ids)
    with pytest.raises(KeyError):
        reference_model(model, {"model.layers.0.mlp.nope.weight": torch.zeros(1)})


def test_unquantized_dtype_and_sharded_checkpoint(tiny_model, tmp_path):
    _, model = tiny_model("llama")
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_model("llama")[0], name), src / name)
    assert os.path.exists(src / "model.safetensors.index.json")
    dst = tmp_path / "q"
    reference = write_quantized_checkpoint(str(src), str(dst), "gptq", unquantized_dtype=torch.float16)
    tensors = load_checkpoint_tensors(str(dst))
    assert tensors["model.norm.weight"].dtype == torch.float16
    assert torch.equal(reference["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"].float())
    assert _config(dst)["dtype"] == "float16"
    with open(dst / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(tensors)
    for name, shard in weight_map.items():
        assert name in _shard_keys(dst / shard)
    ref = reference_model(model, reference)
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight.half().float())


def _shard_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_writer_argument_errors(tiny_model, tmp_path):
    src, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        write_quantized_checkpoint(src, str(tmp_path), "gguf")
    with pytest.raises(TypeError, match="desc_act"):
        write_quantized_checkpoint(src, str(tmp_path), "awq", desc_act=True)
    with pytest.raises(ValueError, match="differ"):
        write_quantized_checkpoint(src, src, "awq")


def test_bad_input_writers(tiny_model, tmp_path):
    src, _ = tiny_model("llama")
    dst = str(tmp_path)
    write_quantized_checkpoint(src, dst, "gptq", bits=4, group_size=32)
    name = "model.layers.0.self_attn.q_proj.qweight"
    before = load_checkpoint_tensors(dst)
    assert truncate_tensor(dst, name) == (4, 64)
    after = load_checkpoint_tensors(dst)
    assert after[name].shape == (4, 64) and torch.equal(after[name], before[name][:4])
    assert all(torch.equal(after[n], t) for n, t in before.items() if n != name)
    assert truncate_tensor(dst, "model.layers.0.self_attn.q_proj.g_idx") == (32,)
    drop_tensor(dst, "model.layers.1.mlp.up_proj.scales")
    assert "model.layers.1.mlp.up_proj.scales" not in load_checkpoint_tensors(dst)
    with pytest.raises(KeyError):
        truncate_tensor(dst, "model.layers.9.mlp.up_proj.qweight")

    path = set_quant_field(dst, "bits", 5)
    assert path.endswith("config.json") and _config(dst)["quantization_config"]["bits"] == 5
    set_quant_field(dst, "group_size", 48)
    set_quant_field(dst, "desc_act", REMOVE)
    cfg = _config(dst)["quantization_config"]
    assert cfg["group_size"] == 48 and "desc_act" not in cfg


@pytest.mark.parametrize("method,kwargs,filename", [
    ("gptq", {"legacy_config_file": True}, "quantize_config.json"),
    ("awq", {"legacy_config_file": True}, "quant_config.json"),
    ("squeezellm", {}, "quant_config.json"),
])
def test_set_quant_field_in_side_files(tiny_model, tmp_path, method, kwargs, filename):
    src, _ = tiny_model("llama")
    write_quantized_checkpoint(src, str(tmp_path), method, **kwargs)
    assert quant_config_location(str(tmp_path)) == (str(tmp_path / filename), None)
    assert set_quant_field(str(tmp_path), "wbits" if method == "squeezellm" else "bits", 3) == str(tmp_path / filename)
    with open(tmp_path / filename) as f:
        assert json.load(f)["wbits" if method == "squeezellm" else "bits"] == 3
    assert "quantization_config" not in _config(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# cross-check with a real library (GPTQModel, which transformers 5 uses for AWQ and GPTQ, CPU torch paths)

_GPTQMODEL_SCRIPT = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

cases, out = load_file(sys.argv[1]), {}
for key in sorted({k.rsplit(".", 1)[0] for k in cases}):
    kind, bits, group, sym, desc_act, fmt = key.split("|")
    t = {name.rsplit(".", 1)[1]: v for name, v in cases.items() if name.startswith(key + ".")}
    if kind == "awq":
        out[key] = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"].float(), 4, int(group)).T.contiguous()
        continue
    bits, k, n = int(bits), t["g_idx"].numel(), t["scales"].shape[1]
    m = TorchLinear(bits=bits, group_size=int(group), sym=sym == "True", desc_act=desc_act == "True",
                    in_features=k, out_features=n, bias=False, register_buffers=True)
    m._triton_dequant_enabled = False
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(m, name).data.copy_(t[name])
    if fmt == "gptq":
        convert_gptq_v1_to_v2_format_module(m, bits, torch.int32)
    m.eval()
    m.scales.data = m.scales.data.float()  # fp32 so the product is exact, as in our `dequantized`
    out[key] = m.dequantize_weight().T.float().contiguous()
save_file(out, sys.argv[2])
"""


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="GPTQModel not installed")
def test_cross_check_with_gptqmodel(tmp_path):
    """GPTQModel's own unpackers (AWQ dequantize_gemm; GPTQ TorchLinear.dequantize_weight after its v1 -> v2
    conversion) must reconstruct exactly our `dequantized`. Runs in a subprocess: importing gptqmodel edits
    os.environ."""
    from safetensors.torch import load_file, save_file

    cases, expected = {}, {}
    w = rand_w(64, 64, seed=21)
    tensors, deq = quantize_awq(w, 32)
    key = "awq|4|32|False|False|gemm"
    cases.update({f"{key}.{n}": t for n, t in tensors.items()})
    expected[key] = deq
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for desc_act in (False, True):
                for fmt in ("gptq", "gptq_v2"):
                    key = f"gptq|{bits}|32|{sym}|{desc_act}|{fmt}"
                    tensors, deq = quantize_gptq(w[:32], bits, 32, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
                    cases.update({f"{key}.{n}": t for n, t in tensors.items()})
                    expected[key] = deq
    save_file(cases, str(tmp_path / "cases.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _GPTQMODEL_SCRIPT, str(tmp_path / "cases.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    assert got.keys() == expected.keys()
    for key, deq in expected.items():
        assert torch.equal(got[key], deq), key
