"""Llama-family decoder (Llama 1/2/3/3.1, Mistral); Qwen2/Qwen3 reuse it through `DecoderOptions`.

The forward pass takes a flat token dimension (no batch): all sequences of a step are concatenated,
and the attention layer separates them through the forward context's metadata.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphserve.config import ModelConfig
from graphserve.layers.activation import SiluAndMul
from graphserve.layers.attention import Attention
from graphserve.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
from graphserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from graphserve.layers.logits_processor import LogitsProcessor
from graphserve.layers.rotary_embedding import get_partial_rotary_factor, get_rope, get_rope_parameters
from graphserve.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from graphserve.models.config_loader import get_head_dim, get_layer_sliding_window
from graphserve.models.weight_utils import default_weight_loader, kv_scale_target
from graphserve.quantization import get_quant_config
from graphserve.quantization.base import QuantizationConfig


@dataclass(frozen=True)
class DecoderOptions:
    """The few structural switches that distinguish the Llama-like families."""

    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # bias on the output projection (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama with mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    attention_scale: float | None = None  # softmax scale; None = head_dim ** -0.5 (Granite: attention_multiplier)
    residual_multiplier: float = 1.0  # each block's output is scaled before the residual add (Granite)
    embedding_multiplier: float = 1.0  # the token embeddings are scaled (Granite)
    attn_logit_softcap: float | None = None  # attention scores soft-capped: cap * tanh(s / cap) (Gemma 2)
    norm: str = "rms"  # "rms"; "layer": LayerNorm with bias, eps `norm_epsilon` (StarCoder2); "gemma": (1 + w)


def make_norm(hf_config: Any, options: DecoderOptions) -> nn.Module:
    """The family's normalization over hidden_size: RMSNorm, LayerNorm (norm_epsilon) or Gemma's RMSNorm."""
    if options.norm == "layer":
        eps = next((getattr(hf_config, name) for name in ("norm_epsilon", "layer_norm_eps", "layer_norm_epsilon")
                    if getattr(hf_config, name, None) is not None), 1e-5)
        return LayerNorm(hf_config.hidden_size, eps)
    if options.norm == "gemma":
        return GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
    return RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)


class LlamaMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act = SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        if hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"Unsupported activation {hidden_act!r}: silu or gelu_pytorch_tanh")
        self.gelu = hidden_act == "gelu_pytorch_tanh"
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, hidden_size]
        """[num_tokens, hidden_size] -> [num_tokens, hidden_size]."""
        if self.gelu:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


def rope_layer_type(hf_config: Any, layer_idx: int) -> str | None:
    """The layer's type ("sliding_attention", ...) when the config keeps RoPE parameters per layer type, else None."""
    params = getattr(hf_config, "rope_parameters", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if isinstance(params, dict) and layer_types and any(isinstance(v, dict) for v in params.values()):
        return layer_types[layer_idx]
    return None


class LlamaAttention(nn.Module):
    """Fused QKV projection, optional per-head q/k norm, RoPE, paged attention, output projection."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = get_head_dim(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(hf_config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                          bias=options.qkv_bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.q_size, hf_config.hidden_size, bias=options.o_proj_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        if options.qk_norm:
            norm_cls = GemmaRMSNorm if options.norm == "gemma" else RMSNorm
            self.q_norm = norm_cls(self.head_dim, hf_config.rms_norm_eps)
            self.k_norm = norm_cls(self.head_dim, hf_config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        layer_type = rope_layer_type(hf_config, layer_idx)  # Gemma 3: local and global layers rotate differently
        rope_theta, rope_scaling = get_rope_parameters(hf_config, layer_type)
        rotary_dim = int(self.head_dim * get_partial_rotary_factor(hf_config, layer_type))  # Phi-3/4: a part
        self.rotary_emb = get_rope(self.head_dim, rotary_dim, hf_config.max_position_embeddings,
                                   rope_theta, rope_scaling, is_neox_style=True)
        scale = options.attention_scale if options.attention_scale is not None else self.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads, layer_idx,
                              sliding_window=get_layer_sliding_window(hf_config, layer_idx),
                              logits_soft_cap=options.attn_logit_softcap)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # positions: [num_tokens]; hidden_states: [num_tokens, hidden_size]
        """Self-attention over the tokens of the current step -> [num_tokens, hidden_size]."""
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            # RMSNorm over each head's head_dim features, as HF Qwen3 does.
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


# (hf_config, layer index, options, prefix, quant_config) -> the layer's feed-forward module (dense or MoE)
MlpFactory = Callable[[Any, int, DecoderOptions, str, "QuantizationConfig | None"], nn.Module]


def dense_mlp(hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str,
              quant_config: QuantizationConfig | None) -> nn.Module:
    """The Llama SwiGLU MLP of `intermediate_size`."""
    return LlamaMLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, options.mlp_bias,
                    prefix=prefix, quant_config=quant_config)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder block; the residual travels alongside so each RMSNorm can fuse the add."""

    def __init__(self, hf_config: Any, layer_idx: int, options: DecoderOptions, prefix: str = "",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = dense_mlp):
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, layer_idx, options, prefix=f"{prefix}.self_attn",
                                        quant_config=quant_config)
        self.mlp = mlp_factory(hf_config, layer_idx, options, f"{prefix}.mlp", quant_config)
        self.residual_multiplier = options.residual_multiplier
        self.input_layernorm = make_norm(hf_config, options)
        self.post_attention_layernorm = make_norm(hf_config, options)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; hidden_states, residual: [num_tokens, hidden_size]
        """Return (mlp output, residual stream before it); the next norm adds them."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        return hidden_states, residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF `model.*` names)."""

    def __init__(self, hf_config: Any, options: DecoderOptions, prefix: str = "model",
                 quant_config: QuantizationConfig | None = None, mlp_factory: MlpFactory = dense_mlp,
                 layer_cls: type[nn.Module] | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens", quant_config=quant_config)
        layer_cls = layer_cls or LlamaDecoderLayer
        self.layers = nn.ModuleList(
            layer_cls(hf_config, i, options, prefix=f"{prefix}.layers.{i}", quant_config=quant_config,
                      mlp_factory=mlp_factory)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = make_norm(hf_config, options)
        self.embedding_multiplier = options.embedding_multiplier

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [num_tokens]
        """[num_tokens] ids -> [num_tokens, hidden_size] final hidden states."""
        hidden_states = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Llama causal LM (also serves MistralForCausalLM: the sliding window comes from the config)."""

    # (fused parameter name, checkpoint name, shard id)
    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    ]
    # Buffers some old checkpoints saved; we recompute them.
    skipped_weight_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
    # (checkpoint substring, ours) applied to every name first (Mixtral's block_sparse_moe is our mlp).
    weight_name_rewrites: list[tuple[str, str]] = []
    # MoE models: the checkpoint's per-expert projection names -> FusedMoE shards (w1 gate, w3 up, w2 down).
    expert_weight_names: dict[str, str] = {}
    mlp_factory: MlpFactory = staticmethod(dense_mlp)
    decoder_layer_cls: type[nn.Module] | None = None  # None: LlamaDecoderLayer (OLMo 2 brings its own)

    def __init__(self, model_config: ModelConfig):
        super().__init__()
        hf_config = model_config.hf_config
        self.model_config = model_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.quant_config = get_quant_config(model_config)
        self.model = LlamaModel(hf_config, self.get_decoder_options(hf_config), quant_config=self.quant_config,
                                mlp_factory=type(self).mlp_factory, layer_cls=self.decoder_layer_cls)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, prefix="lm_head",
                                      quant_config=self.quant_config)
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(hf_config.vocab_size, scale=self.get_logits_scale(hf_config))

    @classmethod
    def get_decoder_options(cls, hf_config: Any) -> DecoderOptions:
        """Structural switches read from a Llama config."""
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=attention_bias, o_proj_bias=attention_bias,
                              mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    @classmethod
    def get_logits_scale(cls, hf_config: Any) -> float:
        """The factor the logits are multiplied by (1.0; Granite divides by `logits_scaling`)."""
        return 1.0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [num_tokens]
        """[num_tokens] ids -> [num_tokens, hidden_size] hidden states (logits are computed separately)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden_size]
        """[num_tokens, hidden_size] -> [num_tokens, vocab_size] float32 logits."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors through each parameter's weight_loader; return the parameter names filled.

        A packed parameter (qkv_proj, gate_up_proj) counts as loaded only once all of its shards were.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, set[Any]] = {}
        for name, tensor in weights:
            if name.endswith(self.skipped_weight_suffixes):
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue  # the head is the embedding; some checkpoints still store a copy
            kv_scale = kv_scale_target(name)
            if kv_scale is not None:  # an FP8 KV cache scale: a buffer of the layer's attention, optional
                if tensor.numel() != 1:
                    raise ValueError(f"Checkpoint tensor {name!r}: a KV cache scale must be one number, got shape "
                                     f"{list(tensor.shape)}")
                self.get_submodule(kv_scale[0]).attn.set_kv_scale(kv_scale[1], float(tensor.reshape(())))
                continue
            param_name, shard_id = self._map_weight_name(name)
            if param_name not in params:
                raise ValueError(f"Checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            param = params[param_name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                if shard_id is None:
                    weight_loader(param, tensor)
                else:
                    weight_loader(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"Cannot load checkpoint tensor {name!r} into {param_name!r}: {e}") from e
            if shard_id is None:
                loaded.add(param_name)
            else:
                shards_seen.setdefault(param_name, set()).add(shard_id)
        for param_name, seen in shards_seen.items():
            expected = getattr(params[param_name], "expected_shards", None) or self._expected_shards(param_name)
            if seen == expected:
                loaded.add(param_name)
        return loaded

    _EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")

    def _map_weight_name(self, name: str) -> tuple[str, Any]:
        for old, new in self.weight_name_rewrites:
            name = name.replace(old, new)
        match = self._EXPERT_RE.match(name) if self.expert_weight_names else None
        if match is not None and match.group(3) in self.expert_weight_names:
            shard = self.expert_weight_names[match.group(3)]
            return f"{match.group(1)}.{'w2_weight' if shard == 'w2' else 'w13_weight'}", (int(match.group(2)), shard)
        for param_suffix, weight_suffix, shard_id in self.stacked_params_mapping:
            if weight_suffix + "." in name:
                return name.replace(weight_suffix + ".", param_suffix + "."), shard_id
        return name, None

    def _expected_shards(self, param_name: str) -> set[Any]:
        return {sid for suffix, _, sid in self.stacked_params_mapping if suffix + "." in param_name}
