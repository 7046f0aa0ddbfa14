"""``nemolite plan``: from a model's config alone, how it splits over GPUs.

For every tensor × pipeline layout of the GPUs given: weights per rank (Megatron-style tensor
parallelism: attention heads, MLP width and vocabulary split, KV heads split or replicated when
TP exceeds them, norms replicated; pipeline stages balanced by parameters, embedding on the
first, head on the last), KV-cache bytes per token per rank, and what the rest of each GPU holds:
the longest context and the batch of full contexts that fit.

``quantization`` sizes the decoder's linear layers (attention, MLP, NAS linear sublayers; the LM head
too with "-head") as they are stored quantized, the rest (embedding, norms, head) staying ``dtype``:

- int8: 1 byte a weight + one fp16 scale per output row (nemolite's int8, compressed-tensors W8A16);
- int4 (group 32), int4-g64, int4-g128: half a byte a weight + one fp16 scale per group, so 4.5, 4.25
  and 4.125 bits a weight; -asym adds an fp16 zero point (or min) per group (nemolite.quant.spec);
- fp8: 1 byte a weight + one fp32 scale per output row (ModelOpt / compressed-tensors FP8 per channel;
  a per-tensor scale is smaller still).

A group must not straddle two tensor-parallel ranks: a layout whose row-parallel layers (o_proj,
down_proj) split the input columns off a group boundary is refused, as vLLM and nemolite refuse it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math

from nemolite.config import LayerSpec, ModelConfig
from nemolite.errors import NemoliteError

GiB = 2**30
WORKSPACE_BYTES = 2 * GiB  # activations, CUDA graphs, allocator slack per GPU
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}
QUANTIZATIONS = ("int8", "int4", "int4-g64", "int4-g128", "int4-asym", "int4-g128-asym", "fp8", "... -head")


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How ``plan`` stores a quantized linear layer's [rows, columns] matrix."""

    name: str  # as given, normalised: "int8", "int4-g128", "fp8-head"...
    bits: int  # per weight
    group_size: int | None  # columns per scale; None: one scale per row
    scale_bytes: int
    zero_bytes: int = 0  # per group (asymmetric)
    lm_head: bool = False
    int8_head: bool = False  # -head8: the LM head int8 per channel, the layers int4

    def matrix_bytes(self, rows: float, columns: float) -> float:
        groups = 1 if self.group_size is None else columns / self.group_size
        return rows * columns * self.bits / 8 + rows * groups * (self.scale_bytes + self.zero_bytes)

    def head_bytes(self, rows: float, columns: float) -> float:
        """The quantized LM head's matrix (with ``lm_head``)."""
        return (WeightFormat(self.name, 8, None, 2) if self.int8_head else self).matrix_bytes(rows, columns)

    def bits_per_weight(self, columns: int = 8192) -> float:
        return self.matrix_bytes(1, columns) * 8 / columns


def weight_format(quantization: str | None) -> WeightFormat | None:
    """``--quantization`` of ``plan``: nemolite's spellings (nemolite.quant.spec) and fp8; None/"none": float."""
    from nemolite.quant.spec import parse_quantization

    if quantization is None or quantization.strip().lower() in ("", "none"):
        return None
    text = quantization.strip().lower()
    if text in ("fp8", "fp8-head"):
        return WeightFormat(text, 8, None, 4, lm_head=text.endswith("-head"))
    try:
        spec = parse_quantization(text)
    except NemoliteError as error:
        raise NemoliteError(f"{error}; plan also sizes fp8") from None
    if spec.method == "int8":
        return WeightFormat(str(spec), 8, None, 2, lm_head=spec.lm_head)
    return WeightFormat(str(spec), 4, spec.group_size, 2, 0 if spec.symmetric else 2, lm_head=spec.lm_head,
                        int8_head=spec.int8_head)


@dataclasses.dataclass
class Layout:
    tp: int
    pp: int
    weight_bytes: float  # the fullest rank's
    kv_bytes_per_token: float  # the fullest rank's
    kv_budget_bytes: float
    max_tokens: int  # tokens of KV cache that fit on every rank
    max_context: int
    max_batch: int  # sequences of max_context tokens
    problem: str | None = None

    @property
    def fits(self) -> bool:
        return self.problem is None


def layer_matrices(config: ModelConfig, spec: LayerSpec, tp: int) -> tuple[list[tuple[float, float]], float]:
    """The linear layers' [rows, columns] of one layer on one tensor-parallel rank, and its other
    parameters (norms)."""
    d, hd = config.hidden_size, config.head_dim
    matrices, other = [], 0.0
    if spec.attention == "attention":
        kv_heads = math.ceil(spec.num_kv_heads / tp)  # replicated when TP > KV heads
        q = config.num_attention_heads * hd / tp
        matrices += [(q, d), (kv_heads * hd, d), (kv_heads * hd, d), (d, q)]  # q, k, v column-, o row-parallel
        other += d  # the norm
    elif spec.attention == "linear":
        matrices.append((d / tp, d))
        other += d
    if spec.mlp in ("relu2", "swiglu"):
        width = spec.intermediate_size / tp
        matrices += [(width, d)] * (2 if spec.mlp == "swiglu" else 1) + [(d, width)]  # gate, up; down
        other += d
    elif spec.mlp == "linear":
        matrices.append((d / tp, d))
        other += d
    return matrices, other


def layer_parameters(config: ModelConfig, spec: LayerSpec, tp: int) -> float:
    """Parameters of one layer held by one tensor-parallel rank."""
    matrices, other = layer_matrices(config, spec, tp)
    return sum(rows * columns for rows, columns in matrices) + other


def layer_bytes(config: ModelConfig, spec: LayerSpec, tp: int, dtype_bytes: int,
                quant: WeightFormat | None) -> float:
    matrices, other = layer_matrices(config, spec, tp)
    if quant is None:
        return (sum(rows * columns for rows, columns in matrices) + other) * dtype_bytes
    return sum(quant.matrix_bytes(rows, columns) for rows, columns in matrices) + other * dtype_bytes


def _split_groups(config: ModelConfig, tp: int, quant: WeightFormat | None) -> str | None:
    """Why ``quant``'s groups do not split over ``tp`` ranks, or None."""
    if quant is None or quant.group_size is None:
        return None
    for spec in config.layers:
        for rows, columns in layer_matrices(config, spec, tp)[0]:
            if columns % quant.group_size:
                return (f"{quant.name}: groups of {quant.group_size} columns do not divide a layer's "
                        f"{columns:g} input columns per rank at TP {tp}")
    return None


def _kv_values_per_token(config: ModelConfig, spec: LayerSpec, tp: int) -> int:
    return 2 * math.ceil(spec.num_kv_heads / tp) * config.head_dim if spec.has_kv_cache else 0


def balanced_stages(costs: list[float], pp: int) -> list[range]:
    """Consecutive layer ranges of about equal cost (NAS layers differ a lot), one layer at least each."""
    cumulative = list(itertools.accumulate(costs))
    bounds = [0]
    for stage in range(1, pp):
        target = cumulative[-1] * stage / pp
        index = bisect.bisect_left(cumulative, target)  # layers [0, index] reach the target
        cut = index + 1 if index == 0 or cumulative[index] - target < target - cumulative[index - 1] else index
        bounds.append(min(max(cut, bounds[-1] + 1), len(costs) - (pp - stage)))
    bounds.append(len(costs))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def plan_layout(config: ModelConfig, tp: int, pp: int, gpu_bytes: float, dtype_bytes: int,
                kv_dtype_bytes: int, quant: WeightFormat | None = None) -> Layout:
    if config.num_attention_heads % tp:
        return Layout(tp, pp, 0, 0, 0, 0, 0, 0, f"{config.num_attention_heads} attention heads do not split "
                                                f"over TP {tp}")
    if pp > config.num_layers:
        return Layout(tp, pp, 0, 0, 0, 0, 0, 0, f"{config.num_layers} layers do not fill {pp} stages")
    problem = _split_groups(config, tp, quant)
    if problem:
        return Layout(tp, pp, 0, 0, 0, 0, 0, 0, problem)
    layer_costs = [layer_bytes(config, spec, tp, dtype_bytes, quant) for spec in config.layers]  # stages by bytes
    vocab = math.ceil(config.vocab_size / (128 * tp)) * 128 * tp / tp  # padded, as Megatron pads it
    embedding = vocab * config.hidden_size * dtype_bytes
    head_matrix = quant.head_bytes(vocab, config.hidden_size) if quant is not None and quant.lm_head else \
        vocab * config.hidden_size * dtype_bytes
    head = 0.0 if config.tie_word_embeddings else head_matrix
    worst_weights = worst_kv = 0.0
    for index, layers in enumerate(balanced_stages(layer_costs, pp)):
        weights = sum(layer_costs[i] for i in layers)
        if index == 0:
            weights += embedding
        if index == pp - 1:
            weights += head + config.hidden_size * dtype_bytes  # and the final norm
            if config.tie_word_embeddings and (pp > 1 or (quant is not None and quant.lm_head)):
                weights += head_matrix  # the last stage keeps its own copy of the tied matrix (or a quantized one)
        kv = sum(_kv_values_per_token(config, config.layers[i], tp) for i in layers) * kv_dtype_bytes
        worst_weights, worst_kv = max(worst_weights, weights), max(worst_kv, kv)
    budget = gpu_bytes - WORKSPACE_BYTES - worst_weights
    max_tokens = int(budget // worst_kv) if worst_kv and budget > 0 else (10**12 if budget > 0 else 0)
    context = config.max_position_embeddings
    layout = Layout(tp, pp, worst_weights, worst_kv, budget, max_tokens, min(context, max_tokens),
                    max_tokens // context)
    if budget <= 0:
        layout.problem = (f"weights need {worst_weights / GiB:.1f} GiB per GPU, over the "
                          f"{(gpu_bytes - WORKSPACE_BYTES) / GiB:.1f} GiB left after {WORKSPACE_BYTES / GiB:.0f} "
                          "GiB of workspace")
    elif max_tokens < context:
        layout.problem = f"KV cache holds {max_tokens} tokens, less than one {context}-token context"
    return layout


def plan(config: ModelConfig, gpus: int, gpu_memory_gib: float, dtype: str = "bfloat16",
         kv_dtype: str | None = None, utilization: float = 0.9, quantization: str | None = None) -> list[Layout]:
    """Every TP × PP = ``gpus`` layout (TP a power of two, at most 8 within a node); ``quantization``
    as in the module docstring (None: every weight in ``dtype``)."""
    quant = weight_format(quantization)
    if gpus < 1 or gpu_memory_gib <= 0:
        raise NemoliteError("--gpus must be >= 1 and --gpu-memory > 0")
    if not 0 < utilization <= 1:
        raise NemoliteError("--gpu-memory-utilization must be in (0, 1]")
    for name in (dtype, kv_dtype or dtype):
        if name not in DTYPE_BYTES:
            raise NemoliteError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {name!r}")
    gpu_bytes = gpu_memory_gib * GiB * utilization
    layouts = []
    tp = 1
    while tp <= min(gpus, 8):
        if gpus % tp == 0:
            layouts.append(plan_layout(config, tp, gpus // tp, gpu_bytes, DTYPE_BYTES[dtype],
                                       DTYPE_BYTES[kv_dtype or dtype], quant))
        tp *= 2
    return layouts


def num_parameters(config: ModelConfig) -> float:
    embedding = config.vocab_size * config.hidden_size
    return (sum(layer_parameters(config, spec, 1) for spec in config.layers) + embedding
            + (0 if config.tie_word_embeddings else embedding) + config.hidden_size)


def weight_bytes(config: ModelConfig, dtype: str = "bfloat16", quantization: str | None = None) -> float:
    """Bytes of the whole model's weights (one copy, unsplit, vocabulary unpadded)."""
    quant, size = weight_format(quantization), DTYPE_BYTES[dtype]
    embedding = config.vocab_size * config.hidden_size
    head = 0.0 if config.tie_word_embeddings and not (quant is not None and quant.lm_head) else \
        quant.head_bytes(config.vocab_size, config.hidden_size) if quant is not None and quant.lm_head else \
        embedding * size
    return (sum(layer_bytes(config, spec, 1, size, quant) for spec in config.layers) + embedding * size + head
            + config.hidden_size * size)


def format_plan(config: ModelConfig, layouts: list[Layout], gpus: int, gpu_memory_gib: float, dtype: str,
                quantization: str | None = None) -> str:
    params = num_parameters(config)
    quant = weight_format(quantization)
    what = f"{dtype} weights" if quant is None else \
        (f"weights: linear layers {quant.name} ({quant.bits_per_weight(config.hidden_size):.4g} bits a weight), "
         f"the rest {dtype}")
    lines = [f"{params / 1e9:.1f} B parameters, {weight_bytes(config, dtype, quantization) / 1e9:.0f} GB of {what}; "
             f"{gpus} GPU(s) x {gpu_memory_gib:g} GiB; context {config.max_position_embeddings}",
             f"{'TP':>3} {'PP':>3}  {'weights/GPU':>12}  {'KV/token/GPU':>13}  {'KV room/GPU':>12}  "
             f"{'max tokens':>11}  {'batch @ctx':>10}  fits"]
    for layout in layouts:
        if layout.weight_bytes == 0 and layout.problem:
            lines.append(f"{layout.tp:>3} {layout.pp:>3}  {'-':>12}  {'-':>13}  {'-':>12}  {'-':>11}  {'-':>10}  "
                         f"no: {layout.problem}")
            continue
        lines.append(f"{layout.tp:>3} {layout.pp:>3}  {layout.weight_bytes / GiB:>8.1f} GiB  "
                     f"{layout.kv_bytes_per_token / 1024:>9.1f} KiB  {max(layout.kv_budget_bytes, 0) / GiB:>8.1f} GiB  "
                     f"{layout.max_tokens:>11}  {layout.max_batch:>10}  "
                     f"{'yes' if layout.fits else 'no: ' + layout.problem}")
    fitting = [layout for layout in layouts if layout.fits]
    if fitting:
        best = max(fitting, key=lambda layout: (layout.tp, layout.max_tokens))
        lines.append(f"suggested: --tensor-parallel-size {best.tp} --pipeline-parallel-size {best.pp}")
    else:
        lines.append("no layout fits: add GPUs, use GPUs with more memory, a smaller dtype or --quantization")
    return "\n".join(lines)
