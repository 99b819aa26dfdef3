"""Write a Llama-shaped GGUF of random blocks from a config.json, for benchmarks of the kept-quantized GGUF path.

No GGUF of a real 8B model is reachable here (real-data.md), and the `gguf` package cannot quantize K-quants, so the
blocks are random bytes of the layout with small, finite fp16 scales: the bytes a decode step reads and the
kernels it runs are those of a real file of the same recipe; the tokens it produces are noise.

    python -m perf.make_gguf --config perf/configs/llama-3-8b --recipe Q4_K_M --out /tmp/llama8b-Q4_K_M.gguf

Recipes (llama.cpp's, simplified to whole tensor classes): Q4_K_M = Q4_K everywhere except attn_v, ffn_down and
the output head in Q6_K; Q8_0 = Q8_0 everywhere. Norms are F32.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from graphserve.ops import gguf as gguf_ops

RECIPES = {
    "Q4_K_M": {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"},
    "Q8_0": {"default": "Q8_0"},
}
_SCALE = {"Q8_0": 2e-3, "Q4_0": 1e-2, "Q5_0": 5e-3, "Q4_K": 1e-3, "Q5_K": 5e-4, "Q6_K": 5e-4}


def random_blocks(qtype_name: str, rows: int, cols: int, rng: np.random.Generator):
    """[rows, row_bytes] uint8 of random blocks with finite scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    raw = np.frombuffer(rng.bytes(rows * cols // block * size), dtype=np.uint8).reshape(-1, size).copy()
    scale = (rng.random((raw.shape[0], 1), dtype=np.float32) * _SCALE[qtype_name]).astype(np.float16)
    for offset in gguf_ops.FP16_FIELD_OFFSETS[qtype_name]:
        raw[:, offset:offset + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def write_random_llama_gguf(config: dict, recipe: str, path: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    types = RECIPES[recipe]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)

    def add(name: str, kind: str, rows: int, cols: int) -> None:
        qtype = types.get(kind, types["default"])
        writer.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=gguf.GGMLQuantizationType[qtype])

    add("token_embd.weight", "token_embd", config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        for kind, rows, cols in (("attn_q", heads * head_dim, hidden), ("attn_k", kv_heads * head_dim, hidden),
                                 ("attn_v", kv_heads * head_dim, hidden), ("attn_output", hidden, heads * head_dim),
                                 ("ffn_gate", inter, hidden), ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            add(f"blk.{i}.{kind}.weight", kind, rows, cols)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", "output", config["vocab_size"], hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a directory holding config.json (perf/configs/...)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="Q4_K_M")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    args = parser.parse_args()
    with open(os.path.join(args.config, "config.json")) as f:
        config = json.load(f)
    write_random_llama_gguf(config, args.recipe, args.out)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
