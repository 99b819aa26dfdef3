"""Linear/embedding/logits layers: weight loaders place each (packed) tensor exactly."""
import pytest
import torch
import torch.nn.functional as F

from graphserve.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    set_weight_attrs,
)
from graphserve.layers.logits_processor import LogitsProcessor
from graphserve.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load(layer, name, tensor, shard_id=None):
    param = getattr(layer, name)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def test_replicated_linear_matches_dense():
    w, b, x = torch.randn(6, 4), torch.randn(6), torch.randn(3, 4)
    layer = ReplicatedLinear(4, 6, bias=True)
    _load(layer, "weight", w)
    _load(layer, "bias", b)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    torch.testing.assert_close(layer(x), F.linear(x, w, b))
    assert not layer.weight.requires_grad


def test_shape_mismatch_is_an_error():
    layer = ReplicatedLinear(4, 6, bias=False)
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        _load(layer, "weight", torch.randn(6, 5))


def test_column_and_row_linear_match_dense():
    w, b, x = torch.randn(8, 4), torch.randn(8), torch.randn(3, 4)
    column = ColumnParallelLinear(4, 8, bias=True)
    _load(column, "weight", w)
    _load(column, "bias", b)
    torch.testing.assert_close(column(x), F.linear(x, w, b))
    w2, b2 = torch.randn(5, 8), torch.randn(5)
    row = RowParallelLinear(8, 5, bias=True)
    _load(row, "weight", w2)
    _load(row, "bias", b2)
    torch.testing.assert_close(row(column(x)), F.linear(F.linear(x, w, b), w2, b2))
    with pytest.raises(ValueError, match="do not add up"):
        ColumnParallelLinear(4, 8, output_sizes=[3, 4])


def test_merged_column_gate_up():
    gate, up, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(3, 4)
    layer = MergedColumnParallelLinear(4, [6, 6], bias=False)
    _load(layer, "weight", up, 1)  # order of arrival must not matter
    _load(layer, "weight", gate, 0)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))
    fused = MergedColumnParallelLinear(4, [6, 6], bias=False)
    _load(fused, "weight", torch.cat([gate, up]))  # an already-fused checkpoint tensor
    torch.testing.assert_close(fused.weight, layer.weight)


def test_merged_column_rejects_bad_shard_id():
    layer = MergedColumnParallelLinear(4, [6, 6], bias=False)
    with pytest.raises(ValueError, match="shard_id"):
        _load(layer, "weight", torch.randn(6, 4), 2)


def test_qkv_with_bias_matches_separate_projections():
    hidden, head, nh, nkv = 8, 4, 4, 2
    wq, wk, wv = torch.randn(nh * head, hidden), torch.randn(nkv * head, hidden), torch.randn(nkv * head, hidden)
    bq, bk, bv = torch.randn(nh * head), torch.randn(nkv * head), torch.randn(nkv * head)
    layer = QKVParallelLinear(hidden, head, nh, nkv, bias=True)
    for sid, w, b in (("v", wv, bv), ("q", wq, bq), ("k", wk, bk)):
        _load(layer, "weight", w, sid)
        _load(layer, "bias", b, sid)
    x = torch.randn(3, hidden)
    q, k, v = layer(x).split([nh * head, nkv * head, nkv * head], dim=-1)
    torch.testing.assert_close(q, F.linear(x, wq, bq))
    torch.testing.assert_close(k, F.linear(x, wk, bk))
    torch.testing.assert_close(v, F.linear(x, wv, bv))
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        _load(layer, "weight", wq, "x")


class _TransposedMethod(LinearMethodBase):
    """A test quant method storing W transposed: proves layers delegate storage and matmul to it."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype, weight_loader):
        weight = torch.nn.Parameter(torch.empty(input_size_per_partition, sum(output_partition_sizes),
                                                dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 0, "output_dim": 1, "weight_loader": weight_loader})
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias=None):
        out = x @ layer.weight
        return out + bias if bias is not None else out


class _TransposedConfig:
    def __init__(self):
        self.prefixes = []

    def get_quant_method(self, layer, prefix):
        self.prefixes.append(prefix)
        return _TransposedMethod() if prefix.endswith("proj") else None


def test_quant_config_selects_the_method_per_layer():
    config = _TransposedConfig()
    gate, up, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(3, 4)
    layer = MergedColumnParallelLinear(4, [6, 6], bias=False, quant_config=config, prefix="mlp.gate_up_proj")
    assert layer.weight.shape == (4, 12)
    _load(layer, "weight", gate.T.contiguous(), 0)
    _load(layer, "weight", up.T.contiguous(), 1)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))
    other = ReplicatedLinear(4, 6, quant_config=config, prefix="mlp.router")
    assert isinstance(other.quant_method, UnquantizedLinearMethod)
    assert config.prefixes == ["mlp.gate_up_proj", "mlp.router"]


def test_vocab_embedding_pads():
    vocab, dim = 100, 8
    table, ids = torch.randn(vocab, dim), torch.tensor([0, 5, 63, 64, 99])
    full = VocabParallelEmbedding(vocab, dim)
    assert full.weight.shape == (128, dim)  # padded to a multiple of 64
    _load(full, "weight", table)
    assert torch.all(full.weight[vocab:] == 0)
    torch.testing.assert_close(full(ids), table[ids])
    with pytest.raises(ValueError, match="rows"):
        _load(full, "weight", torch.randn(vocab + 1, dim))


def test_lm_head_tied_and_logits_processor():
    vocab, dim = 100, 8
    embed = VocabParallelEmbedding(vocab, dim)
    _load(embed, "weight", torch.randn(vocab, dim))
    head = ParallelLMHead(vocab, dim).tie_weights(embed)
    assert head.weight is embed.weight
    hidden = torch.randn(3, dim, dtype=torch.float32)
    logits = LogitsProcessor(vocab)(head, hidden)
    assert logits.shape == (3, vocab) and logits.dtype == torch.float32  # padding columns are cut
    torch.testing.assert_close(logits, hidden @ embed.weight[:vocab].T)
    capped = LogitsProcessor(vocab, scale=0.5, logits_soft_cap=2.0)(head, hidden)
    torch.testing.assert_close(capped, torch.tanh(logits / 2.0) * 2.0 * 0.5)
    assert capped.abs().max() <= 1.0
    with pytest.raises(RuntimeError):
        head(torch.tensor([1]))


def test_logits_are_float32_for_half_models():
    vocab, dim = 64, 8
    head = ParallelLMHead(vocab, dim, params_dtype=torch.bfloat16)
    _load(head, "weight", torch.randn(vocab, dim))
    logits = LogitsProcessor(vocab)(head, torch.randn(2, dim, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (2, vocab)
