"""The worker's adapter manager: wraps the model's projections, keeps adapters on the host (LRU, `max_cpu_loras`)
and in device slots (LRU, `max_loras`), and fills the per-token slot map of each step.

The runner holds an adapter manager whether LoRA is on or not (`create_adapter_manager`): `NoAdapters` does
nothing, so the runner has one code path. The scheduler guarantees at most `max_loras` distinct adapters per step,
so the adapters a step needs always fit the slots; a slot is only reused for another adapter once no request of
the step uses it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from graphserve.buffers import StagedBuffer
from graphserve.config import LoRAConfig, ModelConfig
from graphserve.layers.linear import LinearBase
from graphserve.lora.layers import LoRALinear
from graphserve.lora.peft import SLICES, LoRAModel, ModuleShape, decoder_module_shapes, load_lora_model
from graphserve.lora.request import LoRARequest
from graphserve.ops.lora import LoRAMeta, fill_lora_token_metadata

logger = logging.getLogger(__name__)

LORA_MODULES = frozenset(fused for fused, _ in SLICES.values())


class NoAdapters:
    """LoRA off: nothing to prepare."""

    def prepare_step(self, lora_requests: Sequence[LoRARequest | None], query_lens: np.ndarray, num_tokens: int,
                     num_input: int) -> None:
        """Nothing: the engine refuses LoRA requests when LoRA is off (AdapterRegistry), so none gets here."""

    def prepare_capture(self, size: int) -> None:
        pass


class LoRAModelManager:
    """Adapter slots and the per-step slot map of a LoRA-wrapped model."""

    def __init__(self, model: nn.Module, model_config: ModelConfig, lora_config: LoRAConfig, max_num_tokens: int,
                 device: torch.device, dtype: torch.dtype, pin_memory: bool) -> None:
        self.lora_config = lora_config
        num_slots = lora_config.max_loras
        self.token_lora = StagedBuffer((max_num_tokens,), torch.int32, device, pin_memory)
        self.sorted_ids = StagedBuffer((max_num_tokens,), torch.int32, device, pin_memory)
        self.lora_ids = StagedBuffer((num_slots + 1,), torch.int32, device, pin_memory)
        self.starts = StagedBuffer((num_slots + 2,), torch.int32, device, pin_memory)
        meta = LoRAMeta(self.token_lora.device, self.sorted_ids.device, self.lora_ids.device,
                               self.starts.device)
        self.layers = wrap_lora_layers(model, num_slots, lora_config.max_lora_rank, meta, dtype, device)
        self.module_shapes = {name: ModuleShape(layer.base_layer.input_size, tuple(layer.base_layer.output_sizes))
                              for name, layer in self.layers.items()}
        expected = decoder_module_shapes(model_config)
        if self.module_shapes != expected:
            raise RuntimeError("the model's LoRA-capable modules differ from the ones the engine checks adapters "
                               "against (decoder_module_shapes)")
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, least recently used first
        self._free_slots = list(range(num_slots))
        self._host: OrderedDict[int, LoRAModel] = OrderedDict()  # adapters loaded on the host, LRU first
        self.prepare_capture(max_num_tokens)  # a valid "no adapter" map for profiling and warm-up runs

    def _host_model(self, request: LoRARequest) -> LoRAModel:
        model = self._host.get(request.lora_int_id)
        if model is None or model.request != request:
            model = load_lora_model(request, self.lora_config.max_lora_rank, self.module_shapes)
            self._host[request.lora_int_id] = model
            while len(self._host) > self.lora_config.max_cpu_loras:
                evicted, _ = self._host.popitem(last=False)
                logger.info("LoRA adapter %d dropped from the host cache", evicted)
        self._host.move_to_end(request.lora_int_id)
        return model

    def _slot(self, request: LoRARequest, in_use: set[int]) -> int:
        lora_id = request.lora_int_id
        slot = self._slot_of.get(lora_id)
        if slot is not None and self._host.get(lora_id) is not None and self._host[lora_id].request == request:
            self._slot_of.move_to_end(lora_id)
            self._host.move_to_end(lora_id)
            return slot
        model = self._host_model(request)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop(0)
            else:
                victim = next((i for i in self._slot_of if i not in in_use), None)
                if victim is None:
                    raise RuntimeError(f"more than max_loras={self.lora_config.max_loras} adapters in one step")
                slot = self._slot_of.pop(victim)
        for name, layer in self.layers.items():
            layer.set_slot(slot, model.modules.get(name))
        self._slot_of[lora_id] = slot
        return slot

    def prepare_step(self, lora_requests: Sequence[LoRARequest | None], query_lens: np.ndarray, num_tokens: int,
                     num_input: int) -> None:
        """Put the step's adapters in slots and upload the slot of each of its `num_input` token rows (rows past
        `num_tokens` are graph padding: no adapter)."""
        in_use = {r.lora_int_id for r in lora_requests if r is not None}
        slots = np.array([-1 if r is None else self._slot(r, in_use) for r in lora_requests], dtype=np.int32)
        token_lora = self.token_lora.np[:num_input]
        token_lora[:num_tokens] = np.repeat(slots, query_lens)
        token_lora[num_tokens:] = -1
        self._upload(num_input)

    def prepare_capture(self, size: int) -> None:
        """The map of a graph capture or a dummy run: no adapter on any row."""
        self.token_lora.np[:size] = -1
        self._upload(size)

    @torch.inference_mode()  # the device buffers are inference tensors, like every step input
    def _upload(self, num_input: int) -> None:
        fill_lora_token_metadata(torch.from_numpy(self.token_lora.np[:num_input]), self.lora_config.max_loras,
                                 torch.from_numpy(self.sorted_ids.np), torch.from_numpy(self.lora_ids.np),
                                 torch.from_numpy(self.starts.np))
        for buffer, n in ((self.token_lora, num_input), (self.sorted_ids, num_input), (self.lora_ids, None),
                          (self.starts, None)):
            buffer.upload(n if n is not None else buffer.np.shape[0])


def wrap_lora_layers(model: nn.Module, max_loras: int, max_rank: int, meta: LoRAMeta, dtype: torch.dtype,
                     device: torch.device) -> dict[str, LoRALinear]:
    """Replace every LoRA-capable projection of `model` with a `LoRALinear` around it; {module name: wrapper}."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, LinearBase) and name.rsplit(".", 1)[-1] in LORA_MODULES]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, max_loras, max_rank, meta, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def create_adapter_manager(model: nn.Module, model_config: ModelConfig, lora_config: LoRAConfig | None,
                           max_num_tokens: int, device: torch.device, dtype: torch.dtype,
                           pin_memory: bool) -> LoRAModelManager | NoAdapters:
    """The runner's adapter component: LoRA slots when `lora_config` is set, else a no-op."""
    if lora_config is None:
        return NoAdapters()
    return LoRAModelManager(model, model_config, lora_config, max_num_tokens, device, dtype, pin_memory)
