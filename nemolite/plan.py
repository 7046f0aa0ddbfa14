"""``nemolite plan``: from a model's config alone, how it splits over GPUs.

For every tensor × pipeline layout of the GPUs given: weights per rank (Megatron-style tensor
parallelism: attention heads, MLP width and vocabulary split, KV heads split or replicated when
TP exceeds them, norms replicated; pipeline stages balanced by parameters, embedding on the
first, head on the last), KV-cache bytes per token per rank, and what the rest of each GPU holds:
the longest context and the batch of full contexts that fit.
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


def layer_parameters(config: ModelConfig, spec: LayerSpec, tp: int) -> float:
    """Parameters of one layer held by one tensor-parallel rank."""
    d, hd = config.hidden_size, config.head_dim
    total = 0.0
    if spec.attention == "attention":
        kv_heads = math.ceil(spec.num_kv_heads / tp)  # replicated when TP > KV heads
        q = d * config.num_attention_heads * hd / tp
        total += 2 * q + 2 * d * kv_heads * hd + d  # q and o split, k and v per rank, the norm
    elif spec.attention == "linear":
        total += d * d / tp + d
    if spec.mlp in ("relu2", "swiglu"):
        matrices = 3 if spec.mlp == "swiglu" else 2
        total += matrices * d * spec.intermediate_size / tp + d
    elif spec.mlp == "linear":
        total += d * d / tp + d
    return total


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
                kv_dtype_bytes: int) -> Layout:
    if config.num_attention_heads % tp:
        return Layout(tp, pp, 0, 0, 0, 0, 0, 0, f"{config.num_attention_heads} attention heads do not split "
                                                f"over TP {tp}")
    if pp > config.num_layers:
        return Layout(tp, pp, 0, 0, 0, 0, 0, 0, f"{config.num_layers} layers do not fill {pp} stages")
    layer_costs = [layer_parameters(config, spec, tp) for spec in config.layers]
    vocab = math.ceil(config.vocab_size / (128 * tp)) * 128 * tp / tp  # padded, as Megatron pads it
    embedding = vocab * config.hidden_size
    head = 0.0 if config.tie_word_embeddings else vocab * config.hidden_size
    worst_weights = worst_kv = 0.0
    for index, layers in enumerate(balanced_stages(layer_costs, pp)):
        params = sum(layer_costs[i] for i in layers)
        if index == 0:
            params += embedding
        if index == pp - 1:
            params += head + config.hidden_size  # and the final norm
            if config.tie_word_embeddings and pp > 1:
                params += embedding  # the last stage keeps its own copy of the tied matrix
        kv = sum(_kv_values_per_token(config, config.layers[i], tp) for i in layers) * kv_dtype_bytes
        worst_weights, worst_kv = max(worst_weights, params * dtype_bytes), max(worst_kv, kv)
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
         kv_dtype: str | None = None, utilization: float = 0.9) -> list[Layout]:
    """Every TP × PP = ``gpus`` layout (TP a power of two, at most 8 within a node)."""
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
                                       DTYPE_BYTES[kv_dtype or dtype]))
        tp *= 2
    return layouts


def num_parameters(config: ModelConfig) -> float:
    embedding = config.vocab_size * config.hidden_size
    return (sum(layer_parameters(config, spec, 1) for spec in config.layers) + embedding
            + (0 if config.tie_word_embeddings else embedding) + config.hidden_size)


def format_plan(config: ModelConfig, layouts: list[Layout], gpus: int, gpu_memory_gib: float, dtype: str) -> str:
    params = num_parameters(config)
    lines = [f"{params / 1e9:.1f} B parameters, {params * DTYPE_BYTES[dtype] / 1e9:.0f} GB of {dtype} weights; "
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
        lines.append("no layout fits: add GPUs, use GPUs with more memory, or a smaller dtype")
    return "\n".join(lines)
