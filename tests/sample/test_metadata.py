"""build_sampling_metadata: which tensors exist, their contents, and per-request generator seeding."""
import pytest
import torch

from graphserve.sample.metadata import (
    SamplingRequestState,
    _position_seed,
    build_sampling_metadata,
)
from graphserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 10


def _state(params, prompt=(1, 2), output=(), req_id="r"):
    return SamplingRequestState(req_id, params, list(prompt), list(output))


@pytest.mark.parametrize("device", DEVICES)
def test_all_greedy_no_penalties_builds_nothing(device):
    meta = build_sampling_metadata([_state(SamplingParams(temperature=0.0))] * 3, VOCAB, device)
    assert meta.all_greedy and not meta.all_random and meta.no_penalties
    for name in ("temperature", "top_k", "top_p", "min_p", "is_greedy", "presence_penalties", "prompt_token_ids",
                 "output_token_ids", "logit_bias_indices", "min_tokens_indices"):
        assert getattr(meta, name) is None, name
    assert meta.generators == {} and meta.logits_processors == [] and meta.max_num_logprobs is None


@pytest.mark.parametrize("device", DEVICES)
def test_truncation_tensors(device):
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=3),
              SamplingParams(temperature=1.3, top_k=50)]
    meta = build_sampling_metadata([_state(p) for p in params], VOCAB, device)
    assert not meta.all_greedy and not meta.all_random
    assert meta.temperature.device.type == torch.device(device).type and meta.temperature.dtype == torch.float32
    assert torch.allclose(meta.temperature.cpu(), torch.tensor([1.0, 0.7, 1.3]))  # greedy rows divide by 1
    assert meta.top_k.tolist() == [VOCAB, 3, VOCAB]  # off and > V both mean "all of the vocabulary"
    assert meta.is_greedy.tolist() == [True, False, False]
    assert meta.top_p is None and meta.min_p is None  # nobody asked
    meta = build_sampling_metadata([_state(SamplingParams(top_p=0.5, min_p=0.1)), _state(SamplingParams())],
                                   VOCAB, device)
    assert meta.all_random and meta.is_greedy is None and meta.top_k is None
    assert torch.allclose(meta.top_p.cpu(), torch.tensor([0.5, 1.0]))
    assert torch.allclose(meta.min_p.cpu(), torch.tensor([0.1, 0.0]))


def test_penalty_tensors_padded_with_vocab_size():
    reqs = [_state(SamplingParams(frequency_penalty=0.5), prompt=[1], output=[3, 4, 5]),
            _state(SamplingParams(), prompt=[2, 2], output=[])]
    meta = build_sampling_metadata(reqs, VOCAB, "cpu")
    assert not meta.no_penalties and meta.prompt_token_ids is None  # no repetition penalty: prompt not needed
    assert meta.output_token_ids.tolist() == [[3, 4, 5], [VOCAB] * 3]
    assert meta.frequency_penalties.tolist() == [0.5, 0.0] and meta.repetition_penalties.tolist() == [1.0, 1.0]
    reqs[1] = _state(SamplingParams(repetition_penalty=1.2), prompt=[2, 2], output=[])
    meta = build_sampling_metadata(reqs, VOCAB, "cpu")
    assert meta.prompt_token_ids.tolist() == [[1, VOCAB], [2, 2]]


def test_logit_bias_and_min_tokens_indices():
    stop = SamplingParams(min_tokens=2, stop_token_ids=[4, 99])  # 99 is outside the vocabulary: nothing to mask
    stop.update_from_generation_config([0])
    reqs = [_state(SamplingParams(logit_bias={7: 1.5})), _state(stop, output=[5]), _state(stop, output=[5, 6])]
    meta = build_sampling_metadata(reqs, VOCAB, "cpu")
    assert meta.logit_bias_indices.tolist() == [7] and meta.logit_bias_values.tolist() == [1.5]
    assert meta.min_tokens_indices.tolist() == [VOCAB + 0, VOCAB + 4]  # row 1 only; row 2 reached min_tokens
    with pytest.raises(ValueError, match="logit_bias token id 12"):
        build_sampling_metadata([_state(SamplingParams(logit_bias={12: 1.0}))], VOCAB, "cpu")


def test_max_num_logprobs():
    def meta_for(*values):
        return build_sampling_metadata([_state(SamplingParams(logprobs=v)) for v in values], VOCAB, "cpu")

    assert meta_for(None, None).max_num_logprobs is None
    assert meta_for(None, 0).max_num_logprobs == 0  # still wants the sampled token's rank
    assert meta_for(2, None, 5).max_num_logprobs == 5


def test_logits_processors_rows():
    def proc(ids, logits):
        return logits

    reqs = [_state(SamplingParams()), _state(SamplingParams(logits_processors=[proc]), prompt=[3], output=[4])]
    meta = build_sampling_metadata(reqs, VOCAB, "cpu")
    assert len(meta.logits_processors) == 1
    entry = meta.logits_processors[0]
    assert entry.row == 1 and entry.processors == [proc]
    assert entry.prompt_token_ids == [3] and entry.output_token_ids == [4]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_generator_cached_and_seeded_by_position(device):
    state = _state(SamplingParams(seed=42), output=[1])
    shared = torch.Generator(device=device)
    meta = build_sampling_metadata([_state(SamplingParams()), state], VOCAB, device, generator=shared)
    assert meta.generator is shared and list(meta.generators) == [1]
    gen = meta.generators[1]
    assert gen is state.generator and gen.device.type == torch.device(device).type
    first = torch.empty(8, device=device).exponential_(generator=gen)
    # Next step, same position (e.g. recompute after preemption, or a fresh state object): same draws.
    again = build_sampling_metadata([state], VOCAB, device).generators[0]
    assert again is gen  # cached, not rebuilt
    assert torch.equal(torch.empty(8, device=device).exponential_(generator=again), first)
    fresh = _state(SamplingParams(seed=42), output=[1])
    fresh_gen = build_sampling_metadata([fresh], VOCAB, device).generators[0]
    assert torch.equal(torch.empty(8, device=device).exponential_(generator=fresh_gen), first)
    # One more generated token: a different position, different draws.
    state.output_token_ids.append(2)
    moved = build_sampling_metadata([state], VOCAB, device).generators[0]
    assert not torch.equal(torch.empty(8, device=device).exponential_(generator=moved), first)


def test_position_seed_is_a_63_bit_mix():
    seeds = {_position_seed(s, p) for s in (0, 1, -1, 2**40) for p in range(50)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert _position_seed(5, 3) == _position_seed(5, 3)


def test_empty_batch_rejected():
    with pytest.raises(ValueError):
        build_sampling_metadata([], VOCAB, "cpu")


def test_plain_greedy_fast_path_only_when_nothing_applies():
    """An all-argmax batch builds no tensors; a row still under min_tokens (stop ids masked) leaves the fast path."""
    plain = SamplingParams(temperature=0.0, max_tokens=8)
    plain.update_from_generation_config([2])
    pending = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3)
    pending.update_from_generation_config([2])
    reqs = [SamplingRequestState("a", plain, [5, 6], [7]), SamplingRequestState("b", pending, [5], [9])]
    fast = build_sampling_metadata(reqs[:1], 16, "cpu")
    assert fast.all_greedy and fast.min_tokens_indices is None and fast.output_token_ids is None
    slow = build_sampling_metadata(reqs, 16, "cpu")
    assert slow.min_tokens_indices.tolist() == [16 + 2]
