"""Multi-LoRA ops: the sorted metadata on hand examples and by brute force, the torch references against a dense
per-token definition, the Triton kernels against the references (interpreter, CPU tensors, fp32 / fp16), schemas
and fakes through opcheck."""
import pytest
import torch

from graphserve.ops import lora as lora_ops

SLOTS = 4
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _meta(token_lora: torch.Tensor, slots: int = SLOTS) -> lora_ops.LoRAMeta:
    return lora_ops.LoRAMeta(token_lora, *lora_ops.lora_token_metadata(token_lora, slots))


def _mapping(t: int, layout: str, seed: int) -> torch.Tensor:
    """token -> slot: all one adapter, all without, or mixed and unsorted (slot 2 unused)."""
    if layout == "one":
        return torch.full((t,), 1, dtype=torch.int32)
    if layout == "none":
        return torch.full((t,), -1, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([-1, 0, 1, 3], dtype=torch.int32)
    return choices[torch.randint(0, 4, (t,), generator=g)]


def _adapters(h_in: int, slice_sizes: tuple[int, ...], ranks: list[int | None], max_rank: int,
              dtype: torch.dtype, seed: int):
    """Per slot a rank (None: an empty slot) and per slice its A [r, H_in] and B [n_s, r] (slot 3's slices after the
    first are missing, as a q-only adapter's); returns the packed lora_a, lora_b and the per-slot pieces."""
    g = torch.Generator().manual_seed(seed)
    n = sum(slice_sizes)
    lora_a = torch.zeros(len(ranks), len(slice_sizes) * max_rank, h_in, dtype=dtype)
    lora_b = torch.zeros(len(ranks), n, max_rank, dtype=dtype)
    pieces = []
    for slot, r in enumerate(ranks):
        slot_pieces = []
        lo = 0
        for s, n_s in enumerate(slice_sizes):
            if r is None or (slot == 3 and s > 0):
                slot_pieces.append(None)
            else:
                a = (torch.randn(r, h_in, generator=g) / h_in ** 0.5).to(dtype)
                b = (torch.randn(n_s, r, generator=g) / r ** 0.5).to(dtype)
                lora_a[slot, s * max_rank:s * max_rank + r] = a
                lora_b[slot, lo:lo + n_s, :r] = b
                slot_pieces.append((a, b))
            lo += n_s
        pieces.append(slot_pieces)
    return lora_a, lora_b, pieces


def _dense(y: torch.Tensor, x: torch.Tensor, token_lora: torch.Tensor, pieces, slice_sizes) -> torch.Tensor:
    """y[t] + sum over slices of x[t] @ (B_s A_s)^T in the slice's columns, token by token, in fp64."""
    out = y.double().clone()
    for t, slot in enumerate(token_lora.tolist()):
        if slot < 0:
            continue
        lo = 0
        for piece, n_s in zip(pieces[slot], slice_sizes, strict=True):
            if piece is not None:
                a, b = piece
                out[t, lo:lo + n_s] += x[t].double() @ (b.double() @ a.double()).t()
            lo += n_s
    return out


def _offsets(slice_sizes: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for n_s in slice_sizes:
        offsets.append(offsets[-1] + n_s)
    return offsets


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def test_metadata_hand_examples():
    sorted_ids, ids, start = lora_ops.lora_token_metadata(torch.tensor([2, -1, 0, 2, -1], dtype=torch.int32), 4)
    assert sorted_ids.tolist() == [1, 4, 2, 0, 3]
    assert ids.tolist() == [-1, 0, 2, -1, -1]
    assert start.tolist() == [0, 2, 3, 5, 5, 5]
    assert all(t.dtype == torch.int32 for t in (sorted_ids, ids, start))
    sorted_ids, ids, start = lora_ops.lora_token_metadata(torch.tensor([1, 1, 0], dtype=torch.int32), 2)
    assert (sorted_ids.tolist(), ids.tolist(), start.tolist()) == ([2, 0, 1], [0, 1, -1], [0, 1, 3, 3])
    sorted_ids, ids, start = lora_ops.lora_token_metadata(torch.zeros(0, dtype=torch.int32), 2)
    assert (sorted_ids.tolist(), ids.tolist(), start.tolist()) == ([], [-1, -1, -1], [0, 0, 0, 0])


@pytest.mark.parametrize("seed", range(6))
def test_metadata_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    slots = 1 + seed % 5
    t = int(torch.randint(1, 40, (1,), generator=g))
    mapping = torch.randint(-1, slots, (t,), generator=g, dtype=torch.int32)
    sorted_ids, ids, start = lora_ops.lora_token_metadata(mapping, slots)
    distinct = sorted(set(mapping.tolist()))
    assert ids.tolist() == distinct + [-1] * (slots + 1 - len(distinct))
    assert start[0] == 0 and start.tolist()[len(distinct):] == [t] * (slots + 2 - len(distinct))
    for z, slot in enumerate(distinct):
        segment = sorted_ids[start[z]:start[z + 1]].tolist()
        assert segment == [i for i in range(t) if mapping[i] == slot]  # every row of the slot, in order (stable)


def test_fill_metadata_into_longer_buffers():
    """A persistent buffer for more tokens than this step: only its first T entries are written."""
    sorted_out = torch.full((8,), 99, dtype=torch.int32)
    ids_out = torch.full((4,), 99, dtype=torch.int32)
    start_out = torch.full((5,), 99, dtype=torch.int32)
    lora_ops.fill_lora_token_metadata(torch.tensor([1, -1, 1], dtype=torch.int32), 3, sorted_out, ids_out, start_out)
    assert sorted_out.tolist() == [1, 0, 2] + [99] * 5
    assert ids_out.tolist() == [-1, 1, -1, -1]
    assert start_out.tolist() == [0, 1, 3, 3, 3]
    with pytest.raises(ValueError, match="must lie in"):
        lora_ops.lora_token_metadata(torch.tensor([0, 3], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="too small"):
        lora_ops.fill_lora_token_metadata(torch.tensor([0], dtype=torch.int32), 3, sorted_out, ids_out[:3], start_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slice_sizes", [(40,), (24, 8, 8)])
def test_reference_matches_dense_definition(dtype, slice_sizes):
    """Mixed slots of ranks 8 / 16 / 64 (zero-padded to 64) and an empty slot in one unsorted batch, -1 rows."""
    h_in, max_rank = 48, 64
    lora_a, lora_b, pieces = _adapters(h_in, slice_sizes, [8, 16, None, 64], max_rank, dtype, seed=len(slice_sizes))
    token_lora = torch.tensor([3, -1, 0, 1, 1, 2, -1, 3, 0, 1, 3], dtype=torch.int32)
    t, n = token_lora.numel(), sum(slice_sizes)
    x = torch.randn(t, h_in).to(dtype)
    y = torch.randn(t, n).to(dtype)
    expected = _dense(y, x, token_lora, pieces, slice_sizes)
    meta = _meta(token_lora)
    buf = torch.full((t, len(slice_sizes) * max_rank), float("nan"))
    lora_ops.lora_shrink(buf, x, lora_a, meta)
    out = y.clone()
    lora_ops.lora_expand(out, buf, lora_b, meta, _offsets(slice_sizes))
    assert _rel(out - y, expected - y.double()) < TOL[dtype] * 4  # the LoRA term alone
    assert _rel(out, expected) < TOL[dtype]
    none = token_lora < 0
    assert torch.equal(buf[none], torch.zeros_like(buf[none]))
    assert torch.equal(out[none], y[none])  # rows without an adapter untouched, bit for bit


def test_expand_reference_rejects_bad_offsets():
    meta = _meta(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="slice offsets"):
        lora_ops.lora_expand(torch.zeros(2, 40), torch.zeros(2, 32), torch.zeros(SLOTS, 40, 16), meta, [0, 24, 32])


def test_ops_pass_opcheck():
    lora_a, lora_b, _ = _adapters(32, (24, 8, 8), [8, 16, None, 16], 16, torch.float32, seed=0)
    meta = _meta(torch.tensor([1, -1, 0, 1, 3], dtype=torch.int32))
    torch.library.opcheck(torch.ops.graphserve.lora_shrink.default,
                          (torch.empty(5, 48), torch.randn(5, 32), lora_a, *meta))
    torch.library.opcheck(torch.ops.graphserve.lora_expand.default,
                          (torch.randn(5, 40), torch.randn(5, 48), lora_b, *meta, [0, 24, 32, 40]))


triton_lora = pytest.importorskip("graphserve.ops.triton.lora")


def _run_both(t, layout, rank, slice_sizes, h_in, dtype, shrink_config=None, expand_config=None, seed=0):
    """(Triton buf, reference buf, Triton y, reference y) for one step; the expands both start from the reference
    buffer, so each kernel is checked on its own."""
    torch.manual_seed(seed)
    lora_a, lora_b, _ = _adapters(h_in, slice_sizes, [rank, rank // 2 or 1, None, rank], rank, dtype, seed)
    token_lora = _mapping(t, layout, seed)
    meta = _meta(token_lora)
    width, n = len(slice_sizes) * rank, sum(slice_sizes)
    x = torch.randn(t, h_in).to(dtype)
    buf_ref, buf = torch.empty(t, width), torch.full((t, width), float("nan"))
    lora_ops._lora_shrink_ref(buf_ref, x, lora_a, *meta)
    if shrink_config is None:
        triton_lora.lora_shrink(buf, x, lora_a, *meta)
    else:
        triton_lora.launch_shrink(buf, x, lora_a, *meta[1:], shrink_config)
    y = torch.randn(t, n).to(dtype)
    y_ref, y_out = y.clone(), y.clone()
    lora_ops._lora_expand_ref(y_ref, buf_ref, lora_b, *meta, _offsets(slice_sizes))
    if expand_config is None:
        triton_lora.lora_expand(y_out, buf_ref, lora_b, *meta, _offsets(slice_sizes))
    else:
        triton_lora.launch_expand(y_out, buf_ref, lora_b, *meta[1:], _offsets(slice_sizes), expand_config)
    none = token_lora < 0
    assert torch.equal(buf[none], torch.zeros_like(buf[none]))
    assert torch.equal(y_out[none], y[none])
    return buf, buf_ref, y_out, y_ref, y


def _check(buf, buf_ref, y_out, y_ref, y, dtype):
    torch.testing.assert_close(buf, buf_ref, rtol=1e-4, atol=1e-5)  # same products, another summation order
    assert _rel(y_out, y_ref) < TOL[dtype]
    if not torch.equal(y_ref, y):  # the LoRA term itself, where there is one
        assert _rel(y_out.double() - y.double(), y_ref.double() - y.double()) < 4 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank,slice_sizes,h_in", [
    (8, (40,), 72),  # rank below tl.dot's 16: masked; H_in not a multiple of the K step
    (16, (24, 8, 8), 100),  # uneven qkv-like slices, none a multiple of the 64-column block
    (64, (33, 17), 40),
])
@pytest.mark.parametrize("t,layout", [(1, "mixed"), (5, "one"), (5, "none"), (5, "mixed"), (37, "mixed")])
def test_triton_matches_reference(t, layout, rank, slice_sizes, h_in, dtype):
    _check(*_run_both(t, layout, rank, slice_sizes, h_in, dtype, seed=t + rank), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_large_step_tiles(dtype):
    """The 64-row tiles of long steps, several column blocks per slice and a rank walked in 16-wide steps."""
    shrink = triton_lora.LoRAConfig(block_m=64, block_n=16, block_k=32)
    expand = triton_lora.LoRAConfig(block_m=64, block_n=16, block_k=16)
    _check(*_run_both(70, "mixed", 64, (24, 8, 40), 72, dtype, shrink, expand, seed=3), dtype)
    assert triton_lora.shrink_config(4096, 48).block_m == 64 and triton_lora.shrink_config(8, 48).block_m == 16


def test_triton_rejects_bad_arguments():
    meta = _meta(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="slice offsets"):
        triton_lora.lora_expand(torch.zeros(2, 40), torch.zeros(2, 64), torch.zeros(SLOTS, 40, 16), *meta,
                                [0, 8, 16, 24, 40])
    with pytest.raises(ValueError, match="entries"):
        triton_lora.lora_shrink(torch.zeros(2, 16), torch.zeros(2, 32), torch.zeros(SLOTS + 1, 16, 32), *meta)
