"""Adapter files checked before anything is scheduled: every bad adapter is a ValueError naming the problem, the
engine keeps serving the other requests; the prefix cache never shares blocks across adapters."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from graphserve import LLM, LoRARequest, SamplingParams
from tests.lora.lora_testutils import reference_greedy, write_peft_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    path, hf_model = tiny_model("llama")
    root = tmp_path_factory.mktemp("lora-adapters")
    good = str(root / "good")
    peft_model = write_peft_adapter(hf_model, good, r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                    lora_alpha=16, seed=5)
    llm = LLM(path, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    return path, hf_model, root, good, peft_model, llm


def _variant(root, good: str, name: str, edit) -> str:
    """A copy of the good adapter changed by `edit(dir)`."""
    target = str(root / name)
    if not os.path.exists(target):
        shutil.copytree(good, target)
        edit(target)
    return target


def _edit_config(**fields):
    def edit(d):
        with open(os.path.join(d, "adapter_config.json")) as f:
            config = json.load(f)
        config.update(fields)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(config, f)
    return edit


def _truncate(d):
    file = os.path.join(d, "adapter_model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


def _to_bin(d):
    os.rename(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin"))


def _rename_tensors(old: str, new: str):
    def edit(d):
        file = os.path.join(d, "adapter_model.safetensors")
        tensors = load_file(file)
        save_file({k.replace(old, new): v for k, v in tensors.items()}, file)
    return edit


def _drop_b(d):
    file = os.path.join(d, "adapter_model.safetensors")
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if "v_proj.lora_B" not in k}, file)


BAD = {
    "missing_dir": (None, "not a directory"),
    "truncated": (_truncate, "cannot read adapter_model.safetensors"),
    "pickle": (_to_bin, "adapter_model.bin"),
    "rank_above_max": (_edit_config(r=16), "has rank 8 but the config says r=16"),
    "dora": (_edit_config(use_dora=True), "DoRA"),
    "bias": (_edit_config(bias="all"), "LoRA biases"),
    "modules_to_save": (_edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    "foreign_target_name": (_edit_config(target_modules=["c_attn", "q_proj"]), "c_attn"),
    "foreign_tensor": (_rename_tensors("self_attn.q_proj", "self_attn.c_attn"), "c_attn"),
    "missing_layer": (_rename_tensors("layers.1.", "layers.7."), "the model does not have"),
    "half_pair": (_drop_b, "v_proj.lora_B.weight is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_and_others_unharmed(setup, case):
    path, hf_model, root, good, peft_model, llm = setup
    edit, message = BAD[case]
    adapter_dir = str(root / "does-not-exist") if edit is None else _variant(root, good, case, edit)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7]], params, use_tqdm=False, lora_request=LoRARequest(case, 50, adapter_dir))
    assert not llm.llm_engine.has_unfinished_requests()
    ok = llm.generate([[5, 6, 7]], params, use_tqdm=False, lora_request=LoRARequest("good", 1, good))
    assert ok[0].outputs[0].token_ids == reference_greedy(peft_model, [5, 6, 7], 4)


def test_rank_above_max_lora_rank(setup, tiny_model, tmp_path):
    path, hf_model, *_ = setup
    big = str(tmp_path / "r16")
    write_peft_adapter(hf_model, big, r=16, target_modules=["q_proj"], lora_alpha=16, seed=6)
    llm = setup[-1]
    with pytest.raises(ValueError, match="above max_lora_rank=8"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=LoRARequest("r16", 60, big))


def test_one_id_one_adapter_and_lora_off(setup, tiny_model):
    path, hf_model, root, good, peft_model, llm = setup
    params = SamplingParams(max_tokens=2)
    llm.generate([[5]], params, use_tqdm=False, lora_request=LoRARequest("good", 1, good))
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'good'"):
        llm.generate([[5]], params, use_tqdm=False, lora_request=LoRARequest("other", 1, good))
    with pytest.raises(ValueError, match="lora_request has 2 entries for 1 prompts"):
        llm.generate([[5]], params, use_tqdm=False, lora_request=[None, None])
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, good)
    base_only = LLM(path, dtype="float32")
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        base_only.generate([[5]], params, use_tqdm=False, lora_request=LoRARequest("good", 1, good))


def test_prefix_cache_is_keyed_on_the_adapter(setup, tmp_path):
    """The same long prompt under the base model, adapter A and adapter B: each reuses only its own blocks and
    gets its own tokens."""
    path, hf_model, root, good, peft_model, llm = setup
    other_dir = str(tmp_path / "other")
    other = write_peft_adapter(hf_model, other_dir, r=4, target_modules=["k_proj", "o_proj", "up_proj"],
                               lora_alpha=8, seed=9)
    prompt = list(range(40, 90))  # three full blocks of 16
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    lora_a, lora_b = LoRARequest("good", 1, good), LoRARequest("other", 2, other_dir)
    refs = {None: reference_greedy(hf_model, prompt, 6), "good": reference_greedy(peft_model, prompt, 6),
            "other": reference_greedy(other, prompt, 6)}
    assert len({tuple(v) for v in refs.values()}) == 3
    cached = []
    for lora in (None, lora_a, lora_b, lora_a, None, lora_b, LoRARequest("same-files-new-id", 3, good)):
        out = llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0]
        assert out.outputs[0].token_ids == refs["good" if lora is not None and lora.lora_path == good
                                                else None if lora is None else lora.lora_name]
        cached.append(out.num_cached_tokens)
    # First run under each adapter: nothing from the others' blocks; later runs: their own three full blocks.
    assert cached == [0, 0, 0, 48, 48, 48, 0]
