"""The engine's adapters: which are known, which are read into host memory, which hold a device slot.

``max_loras`` device slots (a step may use that many distinct adapters), ``max_cpu_loras`` adapters kept
read in host memory (least recently used ones are dropped and read again when asked for), and the
requests' adapters registered by id. Slots are handed out least recently used first, never taking one
that the step being prepared uses.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import torch
from torch import nn

from nemolite.errors import NemoliteError
from nemolite.lora.adapter import TARGET_SUFFIXES, LoRAAdapter, adaptable_shapes
from nemolite.lora.layers import LoRALinear, LoRAMapping
from nemolite.lora.request import LoRARequest

log = logging.getLogger(__name__)

# Layers computed as one by fuse_projections, and the checkpoint layers they hold, in output order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _part_rows(parent: nn.Module, fused_name: str, out_features: int) -> list[int]:
    if fused_name == "qkv_proj":
        kv = parent.num_kv_heads * parent.head_dim
        return [parent.num_heads * parent.head_dim, kv, kv]
    return [out_features // 2, out_features // 2]


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear layer: Linear, QuantizedLinear, or a tensor-parallel RowParallelLinear."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    quantized = getattr(module, "quantized", None)
    if quantized is not None:
        return quantized.in_features, quantized.out_features
    return module.weight.shape[1], module.weight.shape[0]


def install_lora_layers(model: nn.Module, num_slots: int, max_rank: int, mapping: LoRAMapping) -> list[LoRALinear]:
    """Wrap every adaptable linear layer of ``model`` (after fuse_projections) in a LoRALinear; the layers."""
    from nemolite.parallel.tensor import RowParallelLinear

    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    layers: list[LoRALinear] = []
    for index, decoder_layer in enumerate(model.model.layers):
        for block_name in ("self_attn", "mlp"):
            parent = getattr(decoder_layer, block_name, None)
            if parent is None:
                continue
            prefix = f"model.layers.{index}.{block_name}"
            for child_name, child in list(parent.named_children()):
                if child_name not in FUSED_PARTS and child_name not in TARGET_SUFFIXES:
                    continue
                in_features, out_features = _features(child)
                if child_name in FUSED_PARTS:
                    names = FUSED_PARTS[child_name]
                    rows = _part_rows(parent, child_name, out_features)
                else:
                    names, rows = (child_name,), [out_features]
                parts, first = [], 0
                for name, count in zip(names, rows):
                    parts.append((f"{prefix}.{name}", first, count))
                    first += count
                row_parallel = isinstance(child, RowParallelLinear)
                input_slice = (child.tp_rank * in_features, in_features) if row_parallel and child.split_input \
                    else None
                layer = LoRALinear(child, parts, in_features, out_features, num_slots, max_rank, mapping, dtype,
                                   device, child.group if row_parallel else None, input_slice)
                setattr(parent, child_name, layer)
                layers.append(layer)
    return layers


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None):
        if max_loras < 1 or max_lora_rank < 1:
            raise NemoliteError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_lora_rank}")
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.device = next(model.parameters()).device
        self.mapping = LoRAMapping()
        self.layers = install_lora_layers(model, max_loras, max_lora_rank, self.mapping)
        self.config, self.parallel = model.config, model.parallel
        self.shapes = adaptable_shapes(model.config)  # the whole model's: adapters are checked against these
        self.requests: dict[int, LoRARequest] = {}  # registered adapters by id
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # read adapters, least recently used first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> device slot, least recently used first
        self.free_slots = list(range(1, max_loras + 1))
        self.num_loads = 0
        self.num_evictions = 0

    # -- adapters by id ---------------------------------------------------------------------------------

    def add(self, request: LoRARequest) -> None:
        """Register ``request``'s adapter, reading and checking it now unless it is read already. A known id
        must name the same adapter."""
        known = self.requests.get(request.lora_int_id)
        if known is not None:
            if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                raise NemoliteError(f"LoRA id {request.lora_int_id} is already adapter {known.lora_name!r} "
                                    f"({known.lora_path}); give each adapter its own lora_int_id")
            self._host_adapter(request.lora_int_id)
            return
        adapter = self._read(request)
        self.requests[request.lora_int_id] = request
        self._keep(request.lora_int_id, adapter)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (its slot is freed; requests already running with it must have ended)."""
        if self.requests.pop(lora_id, None) is None:
            return False
        self.host.pop(lora_id, None)
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        return True

    def _read(self, request: LoRARequest) -> LoRAAdapter:
        from nemolite.lora.formats import read_adapter

        adapter = read_adapter(request.lora_path, request.lora_name, self.shapes, self.max_lora_rank)
        adapter.check(self.shapes, self.max_lora_rank)
        dtype = self.layers[0].lora_a.dtype if self.layers else torch.float32
        for name, w in adapter.weights.items():
            w.lora_a, w.lora_b = self._shard(name, w.lora_a, w.lora_b)
            w.lora_a, w.lora_b = w.lora_a.to(dtype), w.lora_b.to(dtype)
        log.info("LoRA adapter %s: rank %d over %d layers, %.1f MB, from %s", request.lora_name, adapter.rank,
                 len(adapter.weights), adapter.num_bytes / 1e6, request.lora_path)
        return adapter

    def _shard(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This tensor-parallel rank's part: B's rows of a column-parallel layer (as its weight's rows, KV heads
        replicated alike), A's columns of a row-parallel one."""
        if not self.parallel.distributed:
            return lora_a, lora_b
        from nemolite.parallel.tensor import shard_slice

        part = shard_slice(name + ".weight", (lora_b.shape[0], lora_a.shape[1]), self.config, self.parallel)
        if part is None:
            return lora_a, lora_b
        dim, start, length = part
        if dim == 0:
            return lora_a, lora_b.narrow(0, start, length).contiguous()
        return lora_a.narrow(1, start, length).contiguous(), lora_b

    def _host_adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.host.get(lora_id)
        if adapter is None:  # dropped from host memory: read again
            adapter = self._read(self.requests[lora_id])
            self._keep(lora_id, adapter)
        self.host.move_to_end(lora_id)
        return adapter

    def _keep(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.host[lora_id] = adapter
        self.host.move_to_end(lora_id)
        while len(self.host) > self.max_cpu_loras:
            dropped, _ = self.host.popitem(last=False)
            log.info("LoRA adapter %s dropped from host memory", self.requests[dropped].lora_name)

    # -- one step ---------------------------------------------------------------------------------------

    def activate(self, lora_ids: set[int]) -> dict[int, int]:
        """Device slots for the adapters of one step (at most max_loras of them): adapter id -> slot."""
        if len(lora_ids) > self.max_loras:
            raise RuntimeError(f"a step uses {len(lora_ids)} adapters; the scheduler keeps to {self.max_loras}")
        for lora_id in lora_ids:
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
                continue
            if not self.free_slots:
                victim = next(i for i in self.slot_of if i not in lora_ids)
                self.free_slots.append(self.slot_of.pop(victim))
                self.num_evictions += 1
            slot = self.free_slots.pop()
            weights = self._host_adapter(lora_id).weights
            for layer in self.layers:
                layer.set_slot(slot, weights)
            self.slot_of[lora_id] = slot
            self.num_loads += 1
        return {lora_id: self.slot_of[lora_id] for lora_id in lora_ids}

    def set_token_slots(self, token_lora_ids: list[int]) -> None:
        """Eager step: each flattened token's adapter id (0: the base model)."""
        slots = self.activate(set(token_lora_ids) - {0})
        slots[0] = 0
        self.mapping.set_tokens([slots[i] for i in token_lora_ids], self.device)

    @contextlib.contextmanager
    def step(self, token_lora_ids: list[int] | None):
        """The adapters of one eager forward pass (None: none), cleared after it. Every rank of a parallel job
        runs the same steps in the same order, so their slots agree."""
        if token_lora_ids is not None:
            self.set_token_slots(token_lora_ids)
        try:
            yield
        finally:
            self.mapping.clear()

    def static_slots(self, seq_lora_ids: list[int], padded: int) -> torch.Tensor:
        """Compiled decode step: [padded] slot of each row (padding rows: slot 0)."""
        slots = self.activate(set(seq_lora_ids) - {0})
        slots[0] = 0
        return torch.tensor([slots[i] for i in seq_lora_ids] + [0] * (padded - len(seq_lora_ids)),
                            dtype=torch.long, device=self.device)

    def stats(self) -> dict[str, int]:
        return {"lora_adapters": len(self.requests), "lora_loads": self.num_loads,
                "lora_evictions": self.num_evictions}
