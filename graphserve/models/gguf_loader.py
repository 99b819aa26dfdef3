"""Read llama.cpp GGUF checkpoints: HF config from the metadata, tensors under HF names.

Two ways to load: kept quantized (quantization "gguf", the default on GPUs), where the projections, the embedding
and the head are yielded as their raw blocks [rows, row_bytes] uint8 for `quantization/gguf.py`; or dequantized
to float32 with the `gguf` package and copied into dense parameters in the model dtype (the default on the CPU,
whose torch reference would dequantize every weight at every step). Norms and biases are always dequantized.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# llama.cpp's whole-model tensors -> HF names
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's per-block tensors (blk.N.<name>) -> HF names under model.layers.N
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Precomputed RoPE frequency factors (Llama 3.1 GGUFs); we derive them from the config's rope scaling.
_SKIPPED = {"rope_freqs.weight"}
# llama.cpp's converter interleaves the rotary halves of q/k rows only for these architectures.
_PERMUTED_ARCHS = {"llama"}


def load_gguf_config(model_dir: str, gguf_file: str) -> Any:
    """Build the HF PretrainedConfig from the GGUF metadata (transformers' GGUF config parser)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)


def gguf_to_hf_name(name: str) -> str | None:
    """Map a llama.cpp tensor name to its HF Llama-family name; None for tensors we skip."""
    if name in _SKIPPED:
        return None
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"Unsupported GGUF tensor {name!r}")
    layer, block_name, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[block_name]}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (weight [num_heads * head_dim, ...] or bias [num_heads * head_dim]).

    llama.cpp stores each head's rows as interleaved (even, odd) rotary pairs, because it applies
    GPT-J style RoPE; HF Llama expects the two halves of the head one after the other (NeoX style).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"{rows} rows cannot be split into {num_heads} heads of rotary pairs")
    rest = weight.shape[1:]
    # On disk a head's rows are [pair0_x, pair0_y, pair1_x, ...]; swap back to [x..., y...].
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


_KEPT_SUFFIXES = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")


def is_kept_quantized(hf_name: str) -> bool:
    """Whether the quantization "gguf" keeps this tensor in its blocks (projections, embedding, head)."""
    return hf_name.endswith(_KEPT_SUFFIXES)


def gguf_tensor_types(gguf_path: str) -> dict[str, int]:
    """{HF name: ggml type id} of the tensors the "gguf" quantization keeps in blocks (read from the header)."""
    import gguf

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    types = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is not None and is_kept_quantized(hf_name):
            types[hf_name] = int(tensor.tensor_type)
    return types


def _raw_blocks(tensor: Any) -> torch.Tensor:
    """A tensor's bytes as [rows, row_bytes] uint8 (quantized blocks, or the F32/F16/BF16 values)."""
    array = np.ascontiguousarray(tensor.data)
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1  # GGUF shapes list the columns first
    return torch.from_numpy(np.array(array.view(np.uint8).reshape(rows, -1)))


def gguf_weights_iterator(gguf_path: str, hf_config: Any, keep_quantized: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor of the GGUF file, q/k un-permuted where needed: float32 values,
    or with `keep_quantized` the raw blocks of the projections, the embedding and the head."""
    import gguf

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = gguf.GGUFReader(gguf_path)
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8")
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    for tensor in reader.tensors:
        hf_name = gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        if keep_quantized and is_kept_quantized(hf_name):
            weight = _raw_blocks(tensor)  # un-permuting q/k moves whole rows: it works on blocks too
        else:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            # F32 tensors come back as read-only views of the memory-mapped file.
            weight = torch.from_numpy(array if array.flags.writeable else np.array(array))
        if arch in _PERMUTED_ARCHS:
            if ".self_attn.q_proj." in hf_name:
                weight = unpermute_qk(weight, num_heads)
            elif ".self_attn.k_proj." in hf_name:
                weight = unpermute_qk(weight, num_kv_heads)
        yield hf_name, weight
