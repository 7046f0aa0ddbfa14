"""The decode step as one ``torch.compile``d graph: B sequences, one new token each.

Decode is bound by reading the weights, and eager PyTorch pays per-operator overhead on top
of a plain bf16 GEMV. Compiled with inductor's freezing, the weights become constants that
oneDNN prepacks, and the ~40 small operators of a layer fuse into a few kernels.

The graph mutates nothing: each layer attends over the sequence's cached positions (on the
CPU read in place by ``nemolite::decode_attention``, elsewhere gathered from the paged cache by
slot) plus its own new key, and returns the new keys and values, which the runner writes into
the cache afterwards. Batch sizes are padded to a few
buckets and the context length is a dynamic dimension, so graphs are reused.
"""

from __future__ import annotations

import logging
import time

import torch

from nemolite.model import CausalLM, cpu_kernels
from nemolite.model.layers import causal_attention

log = logging.getLogger(__name__)
SERIAL_ELEMENTS = 8192
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXT_BUCKET = 64


def batch_bucket(batch_size: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= batch_size), batch_size)


class _GraphAttention:
    """Stands in for the cache while the graph is traced."""

    def __init__(self, key_caches: list, value_caches: list, context_slots: torch.Tensor, context_mask: torch.Tensor,
                 lengths: torch.Tensor, paged_kernel: bool):
        self.key_caches, self.value_caches = key_caches, value_caches
        self.context_slots = context_slots  # [B, S] slots of the positions before the new token
        self.lengths = lengths  # [B] how many of them are filled
        self.paged_kernel = paged_kernel
        # [B, 1, 1, S + 1]: the filled context positions, then the new token itself (the kernel uses lengths).
        self.mask = None if paged_kernel else \
            torch.cat([context_mask, torch.ones_like(context_mask[:, :1])], dim=1)[:, None, None, :]
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, 1, hd], k/v [B, G, 1, hd] -> [B, H, 1, hd]."""
        self.new_keys.append(k[:, :, 0])
        self.new_values.append(v[:, :, 0])
        if self.paged_kernel:  # reads the cache in place: no gather, no concatenation
            return torch.ops.nemolite.decode_attention(
                q[:, :, 0], self.key_caches[layer_index], self.value_caches[layer_index], self.context_slots,
                self.lengths, k[:, :, 0], v[:, :, 0], q.shape[-1] ** -0.5)[:, :, None]
        cached_keys = self.key_caches[layer_index][self.context_slots].transpose(1, 2)  # [B, G, S, hd]
        cached_values = self.value_caches[layer_index][self.context_slots].transpose(1, 2)
        keys = torch.cat([cached_keys, k], dim=2)
        values = torch.cat([cached_values, v], dim=2)
        return causal_attention(q, keys, values, mask=self.mask)

    def advance(self, num_tokens: int) -> None:
        pass


class _DirectStep:
    """A compiled decode step called without Dynamo.

    Dynamo's call of a compiled graph (its cache lookup, the bytecode that unpacks the inputs, the AOT
    wrappers) cost 0.4 - 0.6 ms of a 6.5 ms batch-1 int4 step on the 2-core CPU, more than inside a
    micro-benchmark: streaming the weights evicts the interpreter's data every step. Inductor's
    compiled callable takes the graph's inputs as a flat list, so each kind of step (batch bucket, with or
    without context) keeps it with where each input comes from: a position in the step's flat inputs
    (``[input_ids, positions, context_slots, context_mask, *key_caches, *value_caches]``, then with LoRA
    ``lora_slots``), or for the
    dynamic context length, a size of one of them. The guards Dynamo would check hold by construction:
    a kind fixes the batch bucket, the caches and the dtypes; the context length is dynamic.
    """

    def __init__(self, sources: list[tuple[int, int | None]], compiled, num_layers: int):
        self.sources, self.compiled, self.num_layers = sources, compiled, num_layers

    @classmethod
    def plan(cls, graph: torch.fx.GraphModule, example_inputs: list, compiled, inputs: list | None, num_layers: int):
        if inputs is None:
            return None
        placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
        outputs = next(node for node in graph.graph.nodes if node.op == "output").args[0]
        if len(placeholders) != len(example_inputs) or len(outputs) != 1 + 2 * num_layers:
            return None
        positions = {id(tensor): i for i, tensor in enumerate(inputs) if isinstance(tensor, torch.Tensor)}
        sources: list[tuple[int, int | None]] = []
        for node, example in zip(placeholders, example_inputs):
            if isinstance(example, torch.Tensor) and id(example) in positions:
                sources.append((positions[id(example)], None))
                continue
            if not isinstance(example, torch.SymInt):
                return None
            size = next(((positions.get(id(tensor)), dim) for tensor, other in zip(example_inputs, placeholders)
                         if isinstance(tensor, torch.Tensor)
                         for dim, symbol in enumerate(getattr(other.meta.get("example_value"), "shape", ()))
                         if isinstance(symbol, torch.SymInt) and str(symbol) == str(example)), None)
            if size is None or size[0] is None:
                return None
            sources.append(size)
        return cls(sources, compiled, num_layers)

    def __call__(self, inputs: list):
        args = [inputs[i] if dim is None else inputs[i].shape[dim] for i, dim in self.sources]
        outputs = self.compiled(*args)
        n = self.num_layers
        return outputs[0], list(outputs[1:1 + n]), list(outputs[1 + n:1 + 2 * n])


class CompiledDecoder:
    def __init__(self, model: CausalLM, lora_mapping=None):
        import torch._inductor.config as inductor_config

        first = next(model.parameters())  # the embedding or a norm: the model's device and dtype
        inductor_config.freezing = True  # parameters become constants: weights prepacked once
        inductor_config.cpp_wrapper = first.device.type == "cpu"
        self.model = model
        self.lora_mapping = lora_mapping  # the model's LoRAMapping (nemolite.lora.layers) when it has adapters
        if first.device.type == "cpu" and first.dtype == torch.bfloat16:
            cpu_kernels.enable()  # bf16 GEMV for batch-1 linears, attention straight from the paged cache
        # On CUDA the step is replayed as a CUDA graph (cudagraph trees): one launch instead of hundreds.
        self.cuda_graphs = first.device.type == "cuda"
        self.paged_kernel = cpu_kernels.has("decode_attention")  # decided here: a constant of the traced step
        # the paged kernel takes the context lengths; attention over gathered keys masks the padding
        self.reads_mask = not (first.device.type == "cpu" and self.paged_kernel)
        if first.device.type == "cpu":
            from nemolite.quant import QuantizedLinear, kernels

            # measured before tracing (constants inside the graph), for the methods the model has
            for method in {m.method for m in model.modules() if isinstance(m, QuantizedLinear) and m.cpu_kernel}:
                kernels.max_kernel_rows(first.dtype, method)
        from nemolite.quant import kernels

        kernels.keep_dequantize_unfolded()  # quantized weights stay quantized in the frozen graph
        if self.cuda_graphs:
            self.graph = torch.compile(self._decode, dynamic=False, fullgraph=True, mode="reduce-overhead")
        else:
            self.graph = torch.compile(self._decode, dynamic=False, fullgraph=True, backend=self._inductor)
        self.static_caches: set[int] = set()
        self.compiled_kinds: set[tuple[int, bool, bool]] = set()  # (batch bucket, has context, has LoRA) compiled
        self.compile_seconds = 0.0
        self._tracing_inputs: list | None = None  # the inputs of the Dynamo call under way
        self._tracing_layers = 0  # how many layers with a cache it has
        self._traced: _DirectStep | None = None  # what that call compiled
        self._unchecked: dict[tuple[int, bool, bool], _DirectStep] = {}  # checked against Dynamo on their next call
        self._direct: dict[tuple[int, bool, bool], _DirectStep] = {}

    def _inductor(self, graph: torch.fx.GraphModule, example_inputs: list):
        """Dynamo's backend: inductor, keeping what it compiled so later steps can call it directly."""
        from torch._inductor.compile_fx import compile_fx

        # Inductor splits an elementwise kernel (a layer norm, relu²) between the threads from 2 x 512
        # elements: at batch 1 that is ~5 OpenMP fork/joins a layer at a few us each (0.6 ms of a 6 ms
        # int4 step on 2 cores); below SERIAL_ELEMENTS a thread the kernel runs on one.
        compiled = compile_fx(graph, example_inputs, config_patches={"cpp.min_chunk_size": SERIAL_ELEMENTS})
        self._traced = _DirectStep.plan(graph, example_inputs, compiled, self._tracing_inputs, self._tracing_layers)
        return compiled

    def _check_direct(self, kind, inputs, logits, new_keys, new_values) -> None:
        """A step just compiled is called directly from its next call on, once its direct call has given
        exactly what Dynamo's gave (the outputs' order and the inputs' mapping are then known right)."""
        if self._traced is not None:
            self._unchecked[kind], self._traced = self._traced, None
            return
        candidate = self._unchecked.pop(kind, None)
        if candidate is None:
            return
        try:
            got = candidate(inputs)
        except Exception as error:  # noqa: BLE001 - the Dynamo call stays, which is only slower
            log.debug("the compiled step for %s is not called directly: %s", kind, error)
            return
        want = [logits, *new_keys, *new_values]
        if len(got[1]) == len(new_keys) and all(
                torch.equal(a, b) for a, b in zip([got[0], *got[1], *got[2]], want)):
            self._direct[kind] = candidate
        else:
            log.debug("the compiled step for %s gave other outputs called directly: Dynamo keeps it", kind)

    @property
    def compiled_buckets(self) -> set[int]:
        return {kind[0] for kind in self.compiled_kinds}

    def _decode(self, input_ids, positions, context_slots, context_mask, key_caches, value_caches,
                lora_slots=None):
        paged_kernel = input_ids.device.type == "cpu" and self.paged_kernel
        attention = _GraphAttention(key_caches, value_caches, context_slots, context_mask, positions, paged_kernel)
        if self.lora_mapping is not None:  # each row's adapter slot is an input (nemolite::lora_delta reads them)
            self.lora_mapping.set_static(lora_slots)
        logits = self.model(input_ids[:, None], positions[:, None], cache=attention)[:, 0]
        if self.lora_mapping is not None:
            self.lora_mapping.clear()
        return logits.float(), attention.new_keys, attention.new_values

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, context_slots: torch.Tensor,
                 context_mask: torch.Tensor, key_caches: list, value_caches: list,
                 lora_slots: torch.Tensor | None = None):
        """input_ids, positions [B]; context_slots, context_mask [B, S] -> logits [B, V], the indices of the
        layers with a cache, and their new keys and values [B, G, hd] in that order. ``lora_slots`` [bucket]
        (already padded): the LoRA slot of each row, when a row of the step has an adapter.

        S is a multiple of CONTEXT_BUCKET (ModelRunner.context_slots pads it): where a backend specialises
        the length (CUDA does), graphs are still reused for 64 positions at a time."""
        batch = input_ids.shape[0]
        bucket = batch_bucket(batch)
        if bucket != batch:
            pad = bucket - batch
            input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
            context_slots = torch.cat([context_slots, context_slots.new_zeros(pad, context_slots.shape[1])])
            context_mask = torch.cat([context_mask, context_mask.new_zeros(pad, context_mask.shape[1])])
        if context_slots.shape[1] % CONTEXT_BUCKET:
            raise ValueError(f"context length {context_slots.shape[1]} is not a multiple of {CONTEXT_BUCKET}")
        layers = [i for i, c in enumerate(key_caches) if c is not None]
        if self.cuda_graphs:
            for cache in (*key_caches, *value_caches):
                if cache is not None and id(cache) not in self.static_caches:
                    # The graphs read the caches in place; without this each replay would copy them.
                    torch._dynamo.mark_static_address(cache)
                    self.static_caches.add(id(cache))
            torch.compiler.cudagraph_mark_step_begin()
        started = time.perf_counter()
        # Dynamo checks ~1,900 guards (module attributes, mostly) before each call: ~0.8 ms, 5 % of a
        # batch-1 int4 step on a 2-core CPU. Once a graph exists for this batch bucket and kind of context
        # (none, or the dynamic length), nothing the guards watch changes between steps, so only the guards
        # that tell the compiled graphs apart are run; a new kind is called with every guard, and compiles.
        kind = (bucket, context_slots.shape[1] > 0, lora_slots is not None)
        new_bucket = bucket not in self.compiled_buckets
        inputs = [input_ids, positions, context_slots, context_mask, *key_caches, *value_caches]
        if lora_slots is not None:
            inputs.append(lora_slots)
        direct = self._direct.get(kind)
        if direct is not None:
            logits, new_keys, new_values = direct(inputs)
        else:
            torch._dynamo.maybe_mark_dynamic(context_slots, 1)
            torch._dynamo.maybe_mark_dynamic(context_mask, 1)
            self._tracing_inputs, self._traced, self._tracing_layers = inputs, None, len(layers)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=kind in self.compiled_kinds):
                logits, new_keys, new_values = self.graph(input_ids, positions, context_slots, context_mask,
                                                          key_caches, value_caches, lora_slots)
            self._tracing_inputs = None
            self._check_direct(kind, inputs, logits, new_keys, new_values)
        self.compiled_kinds.add(kind)
        if new_bucket:
            self.compile_seconds += time.perf_counter() - started
            log.info("compiled the decode step for batch %d in %.1f s", bucket, time.perf_counter() - started)
        if bucket != batch:
            logits, new_keys, new_values = logits[:batch], [k[:batch] for k in new_keys], [v[:batch] for v in new_values]
        return logits, layers, list(new_keys), list(new_values)
