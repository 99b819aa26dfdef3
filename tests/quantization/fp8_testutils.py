"""Test-side oracle for FP8 W8A8 (formats.md §4.3), independent of `graphserve.quantization` and `graphserve.ops`.

- `fp8_round(x, scale)`: x rounded through e4m3 the way the spec says: fp8(clamp(x / scale, ±448)) * scale;
- `write_fp8_checkpoint`: a copy of a tiny HF checkpoint with every decoder projection stored as e4m3 `weight` plus
  `weight_scale` (per tensor: one fp32 scalar per projection; per channel: [N, 1]) and, for a static activation
  scheme, `input_scale` scalars; the quantization config as HF ("fp8") or compressed-tensors writes it;
- `fake_quant_reference`: the transformers model with those weights and every decoder projection's input rounded
  through FP8 at the same point the engine quantizes it (per token, or with the static scale of its fused group).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections the engine multiplies as one fused matrix: they share one static input scale (the largest).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x through e4m3 with `scale` (broadcast): the value a loader or a kernel reads back, in float32."""
    q = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.float() * scale


def _projection(name: str) -> str | None:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS else None


def write_fp8_checkpoint(src_dir: str, dst_dir: str, strategy: str = "tensor", activation_scheme: str = "dynamic",
                         config_format: str = "fp8") -> dict:
    """Copy `src_dir` with its projections in FP8; returns {name: float32 tensor} of the weights as stored
    (dequantized) and of the static input scales ("<prefix>.input_scale")."""
    os.makedirs(dst_dir, exist_ok=True)
    for entry in os.listdir(src_dir):
        if not entry.endswith(".safetensors"):
            src = os.path.join(src_dir, entry)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dst_dir, entry))
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out, reference = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if _projection(name) is None:
            out[name] = tensor
            continue
        w = tensor.float()
        if strategy == "tensor":
            scale = (w.abs().max() / E4M3_MAX).reshape(())
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        prefix = name[: -len(".weight")]
        out[name] = torch.clamp(w / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out[prefix + ".weight_scale"] = scale.float()
        reference[name] = out[name].float() * scale
        if activation_scheme == "static":
            # Distinct per shard, so the test sees the engine take the largest of a fused group.
            out[prefix + ".input_scale"] = (0.02 + 0.02 * torch.rand((), generator=g)).float()
            reference[prefix + ".input_scale"] = out[prefix + ".input_scale"]
    save_file(out, os.path.join(dst_dir, "model.safetensors"))
    with open(os.path.join(dst_dir, "config.json")) as f:
        config = json.load(f)
    if config_format == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": activation_scheme}
    else:
        activations = {"num_bits": 8, "type": "float", "symmetric": True,
                       "strategy": "token" if activation_scheme == "dynamic" else "tensor",
                       "dynamic": activation_scheme == "dynamic"}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": activations,
                                          "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                      "strategy": strategy, "dynamic": False}}}}
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def online_reference_weights(hf_model) -> dict:
    """The weights `--quantization fp8` serves for an unquantized model: per-output-channel e4m3."""
    out = {}
    for name, param in hf_model.state_dict().items():
        if _projection(name) is not None:
            w = param.float()
            out[name] = fp8_round(w, w.abs().amax(dim=1, keepdim=True) / E4M3_MAX)
    return out


def fake_quant_reference(hf_model, reference: dict, activation_scheme: str = "dynamic"):
    """A float32 copy of `hf_model` with the FP8 weights of `reference` and each projection's input rounded
    through e4m3: per token (dynamic) or with the largest static scale of its fused group."""
    model = copy.deepcopy(hf_model).float().eval()
    weights = {k: v for k, v in reference.items() if k.endswith(".weight")}
    model.load_state_dict(weights, strict=False)
    for name, module in model.named_modules():
        proj = name.rsplit(".", 1)[-1]
        if not isinstance(module, torch.nn.Linear) or proj not in PROJECTIONS:
            continue
        if activation_scheme == "dynamic":
            def hook(mod, args):
                x = args[0]
                return (fp8_round(x, x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).to(x.dtype),)
        else:
            parent = name.rsplit(".", 1)[0]
            group = next((grp for grp in FUSED_GROUPS if proj in grp), (proj,))
            scale = max(float(reference[f"{parent}.{p}.input_scale"]) for p in group)

            def hook(mod, args, scale=scale):
                return (fp8_round(args[0], torch.tensor(scale)).to(args[0].dtype),)
        module.register_forward_pre_hook(hook)
    return model
