"""NeMo 1.x LoRA adapters: what ``megatron_gpt_finetuning.py`` with ``peft_scheme=lora`` saves (NeMo <= 2.4).

A ``.nemo`` tar (or its extracted directory, or NIM's layout: a directory holding one ``.nemo``) with
``model_config.yaml`` (the base model's fields plus ``peft.lora_tuning``) and adapter-only weights:
``model_weights.ckpt``, or per tensor/pipeline rank ``mp_rank_XX/`` / ``tp_rank_XX_pp_rank_XXX/``. The rules
are NeMo's own (nemo/collections/nlp/parts/peft_config.py, modules/common/megatron/adapters/
parallel_adapters.py and mcore_mixins.py):

- ``...self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight`` [r, hidden] (A) and ``linear_out`` [rows,
  r] (B) add to the fused QKV output, whose rows are Megatron's: per query group, that group's query heads,
  its key head, its value head, each ``kv_channels`` rows (never assumed hidden / heads). q/k/v share A.
- ``lora_dense_attention_adapter`` -> o_proj, ``lora_4htoh_adapter`` -> down_proj, ``lora_hto4h_adapter`` ->
  [gate; up] for a gated (fast-swiglu) MLP, up_proj for squared-ReLU.
- ``variant: canonical`` has one A and B per part: ``lora_unfused_kqv_adapter.{q,k,v}_adapter`` and
  ``lora_unfused_hto4h_adapter.{gate,up}_adapter``. On an ungated MLP the two halves both feed up_proj, as one
  LoRA of twice the rank (A stacked, B block-diagonal), which is exactly what NeMo adds.
- The output is ``x A^T B^T * alpha / adapter_dim`` (alpha defaults to adapter_dim); the scale goes into B.

Tensor parallelism (ParallelLinearAdapter): a column-parallel target (kqv, hto4h) has ``linear_in`` as a
ColumnParallelLinear(in, r), split along r, and ``linear_out`` ColumnParallelLinear(r, out), split along its
rows; a row-parallel one (dense, 4htoh, ``input_is_parallel``) has ``linear_in`` RowParallelLinear(in, r),
split along its input, and ``linear_out`` split along its rows. Each rank's rows of a fused hto4h are
[gate_r; up_r], regrouped as the base model's linear_fc1 is. Pipeline stages hold their own layers numbered
from 0, shifted here by the stage's first layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nemolite.checkpoint.nemo_archive import NemoArchive
from nemolite.checkpoint.nemo_config import nemo_model_facts, read_model_config
from nemolite.checkpoint.nemo_weights import _SHARD_DIR, MergedTensor, canonical_name
from nemolite.checkpoint.torch_zip import read_torch_checkpoint
from nemolite.errors import NemoliteError
from nemolite.lora.adapter import LoRAAdapter, LoRAWeights

CONFIG_FILE = "model_config.yaml"
# lora_tuning.target_modules values (PEFT_MODULE_MAP) and the adapters each one adds.
TARGET_MODULES = {"attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2", "attention", "mlp", "all"}
# adapter -> (block, column-parallel target?)
ADAPTERS = {
    "lora_kqv_adapter": ("self_attention", True),
    "lora_unfused_kqv_adapter": ("self_attention", True),
    "lora_dense_attention_adapter": ("self_attention", False),
    "lora_hto4h_adapter": ("mlp", True),
    "lora_unfused_hto4h_adapter": ("mlp", True),
    "lora_4htoh_adapter": ("mlp", False),
}
_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp)\.adapter_layer\.(\w+?)\."
                  r"(?:(q|k|v|gate|up)_adapter\.)?linear_(in|out)\.weight$")
_PARTS = {"lora_unfused_kqv_adapter": {"q", "k", "v"}, "lora_unfused_hto4h_adapter": {"gate", "up"}}


def _locate(path: Path, name: str) -> Path:
    """The checkpoint itself: ``path``, or the one ``.nemo`` in a directory without model_config.yaml (NIM)."""
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        found = sorted(path.glob("*.nemo"))
        if len(found) != 1:
            raise NemoliteError(f"LoRA adapter {name!r}: {path} holds {len(found)} .nemo files and no {CONFIG_FILE}; "
                                "give the .nemo file itself, or a directory holding exactly one")
        return found[0]
    return path


def is_nemo_adapter(path: str | Path) -> bool:
    """Whether ``path`` looks like a NeMo checkpoint (what it holds is checked by read_nemo_adapter)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix == ".nemo"
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or len(list(path.glob("*.nemo"))) == 1)


def _refuse(name: str, field: str, value, why: str) -> None:
    raise NemoliteError(f"LoRA adapter {name!r}: model_config.yaml field '{field}' is {value!r}; {why}")


def _positive(name: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _refuse(name, field, value, "it must be a positive number")
    return value


def read_lora_config(raw: dict, name: str) -> tuple[int, float, str]:
    """(adapter_dim, alpha, variant) of a LoRA adapter's model_config.yaml; anything else is refused by field."""
    peft = raw.get("peft")
    if not isinstance(peft, dict) or peft.get("peft_scheme") in (None, "none"):
        raise NemoliteError(f"LoRA adapter {name!r}: model_config.yaml has no peft section with a peft_scheme, so "
                            "this is a NeMo model, not an adapter; serve it as the model (or merge adapters into it)")
    scheme = peft.get("peft_scheme")
    if scheme != "lora":
        _refuse(name, "peft.peft_scheme", scheme, "only 'lora' adapters are served (p-tuning, IA3, canonical "
                "adapters and QLoRA's quantized base are not)")
    lora = peft.get("lora_tuning")
    if not isinstance(lora, dict):
        raise NemoliteError(f"LoRA adapter {name!r}: model_config.yaml has peft_scheme 'lora' but no "
                            "peft.lora_tuning section")
    if lora.get("weight_tying"):
        _refuse(name, "peft.lora_tuning.weight_tying", True,
                "tied LoRA weights with position embeddings are not served")
    variant = lora.get("variant", "nemo") or "nemo"
    if variant not in ("nemo", "canonical"):
        _refuse(name, "peft.lora_tuning.variant", variant, "NeMo knows 'nemo' and 'canonical'")
    targets = lora.get("target_modules", ["attention_qkv"])
    if not isinstance(targets, list) or not targets:
        _refuse(name, "peft.lora_tuning.target_modules", targets, "it must be a list of module names")
    for target in targets:
        if target not in TARGET_MODULES:
            _refuse(name, "peft.lora_tuning.target_modules", target,
                    f"NeMo's LoRA targets are {sorted(TARGET_MODULES)}")
    dim = lora.get("adapter_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        _refuse(name, "peft.lora_tuning.adapter_dim", dim, "it must be a positive integer")
    alpha = lora.get("alpha")
    alpha = dim if alpha is None else _positive(name, "peft.lora_tuning.alpha", alpha)
    uneven = {field: raw.get(field) for field in ("num_layers_in_first_pipeline_stage",
                                                  "num_layers_in_last_pipeline_stage") if raw.get(field) is not None}
    if raw.get("virtual_pipeline_model_parallel_size") not in (None, 1):
        uneven["virtual_pipeline_model_parallel_size"] = raw["virtual_pipeline_model_parallel_size"]
    for field, value in uneven.items():
        _refuse(name, field, value, "only evenly split pipeline stages are read")
    return dim, float(alpha), variant


def read_shards(archive: NemoArchive, name: str) -> dict[tuple[int, int], dict[str, object]]:
    """``{(tp, pp): {mcore name: lazy tensor}}`` of the adapter weights, in whichever layout NeMo saved them."""
    if archive.exists("model_weights.ckpt"):
        files = {(0, 0): "model_weights.ckpt"}
    else:
        files = {}
        for member in archive.names():
            match = _SHARD_DIR.match(member)
            if match and not match.group(4):
                rank = (int(match.group(1)), 0) if match.group(1) is not None else \
                    (int(match.group(2)), int(match.group(3)))
                files[rank] = member
    if not files:
        where = " (a distributed checkpoint: NeMo saves adapters as model_weights.ckpt)" \
            if archive.exists("model_weights/metadata.json") else ""
        raise NemoliteError(f"LoRA adapter {name!r}: {archive.path} holds no model_weights.ckpt, mp_rank_XX/ or "
                            f"tp_rank_XX_pp_rank_XXX/ weights{where}")
    shards = {}
    for rank, member in files.items():
        state = {}
        for key, value in read_torch_checkpoint(archive.window(member)).items():
            if not hasattr(value, "read"):
                kind = "a virtual-pipeline chunk" if isinstance(value, dict) else type(value).__name__
                raise NemoliteError(f"LoRA adapter {name!r}: {member} entry {key!r} is {kind}, not a tensor "
                                    "(virtual pipeline parallelism is not read)")
            canonical = canonical_name(str(key))
            if canonical is not None:
                state[canonical] = value
        shards[rank] = state
    return shards


def merge_shards(shards: dict[tuple[int, int], dict[str, object]], num_layers: int, gated_mlp: bool,
                 name: str) -> dict[str, object]:
    """One global ``{mcore name: lazy tensor}``: tensor-parallel parts concatenated as ParallelLinearAdapter
    splits them, pipeline stages' layer numbers shifted by ``num_layers / stages`` each."""
    tp_size, pp_size = 1 + max(tp for tp, _ in shards), 1 + max(pp for _, pp in shards)
    missing = [(tp, pp) for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in shards]
    if missing:
        raise NemoliteError(f"LoRA adapter {name!r}: model-parallel shards {missing} (tp, pp) are missing")
    if num_layers % pp_size:
        raise NemoliteError(f"LoRA adapter {name!r}: {pp_size} pipeline stages do not split num_layers "
                            f"{num_layers} evenly")
    parts: dict[str, list] = {}
    for (tp, pp), state in shards.items():
        for key, value in state.items():
            match = _KEY.match(key)
            if match is None:
                raise NemoliteError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA adapter weight nemolite "
                                    f"serves (it reads {', '.join(ADAPTERS)})")
            layer = int(match.group(1)) + pp * (num_layers // pp_size)
            global_key = f"decoder.layers.{layer}.{key.split('.', 3)[3]}"
            parts.setdefault(global_key, [None] * tp_size)[tp] = value
    merged = {}
    for key, values in parts.items():
        if any(value is None for value in values):
            raise NemoliteError(f"LoRA adapter {name!r}: {key} is missing from some tensor-parallel shards")
        match = _KEY.match(key)
        adapter, part, side = match.group(3), match.group(4), match.group(5)
        if adapter not in ADAPTERS:
            raise NemoliteError(f"LoRA adapter {name!r}: adapter {adapter!r} ({key}) is not served; nemolite reads "
                                f"{', '.join(ADAPTERS)}")
        if ADAPTERS[adapter][0] != match.group(2) or (part is not None) != (adapter in _PARTS) \
                or part is not None and part not in _PARTS[adapter]:
            raise NemoliteError(f"LoRA adapter {name!r}: {key} is not where NeMo puts {adapter}")
        column = ADAPTERS[adapter][1]
        dim = 1 if side == "in" and not column else 0
        gated = gated_mlp and adapter == "lora_hto4h_adapter" and side == "out"  # a rank's rows: [gate_r; up_r]
        merged[key] = values[0] if tp_size == 1 else MergedTensor(key, values, dim, gated)
    return merged


def _read(tensor, key: str, name: str) -> torch.Tensor:
    value = tensor.read()
    if value.dim() != 2 or tuple(value.shape) != tuple(tensor.shape):
        raise NemoliteError(f"LoRA adapter {name!r}: {key} has shape {list(value.shape)}, not a 2-D weight")
    return value.float()


def _split_qkv(b: torch.Tensor, heads: int, groups: int, head_dim: int, key: str, name: str):
    """Rows grouped per query group as (heads / groups query heads, k head, v head) -> q, k, v rows."""
    if b.shape[0] != (heads + 2 * groups) * head_dim:
        raise NemoliteError(f"LoRA adapter {name!r}: {key} has {b.shape[0]} rows; model_config.yaml implies "
                            f"(num_attention_heads + 2 * num_query_groups) * kv_channels = "
                            f"{(heads + 2 * groups) * head_dim}")
    per_group = b.reshape(groups, heads // groups + 2, head_dim, b.shape[1])
    return (per_group[:, :-2].reshape(heads * head_dim, -1), per_group[:, -2].reshape(groups * head_dim, -1),
            per_group[:, -1].reshape(groups * head_dim, -1))


def read_nemo_adapter(path: str | Path, name: str, shapes: dict[str, tuple[int, int]], config=None) -> LoRAAdapter:
    """A NeMo 1.x LoRA ``.nemo`` as a LoRAAdapter for a model whose adaptable layers have ``shapes`` (name ->
    (out, in)). ``config``: the served model's ModelConfig, to name the field in which the adapter's base
    model differs (without it, LoRAAdapter.check still refuses layers of other shapes)."""
    location = _locate(Path(path).expanduser(), name)
    archive = NemoArchive(location)
    try:
        if not archive.exists(CONFIG_FILE):
            raise NemoliteError(f"LoRA adapter {name!r}: {location} has no {CONFIG_FILE}; it is not a NeMo adapter")
        try:
            text = archive.read_bytes(CONFIG_FILE).decode("utf-8")
        except UnicodeDecodeError as error:
            raise NemoliteError(f"LoRA adapter {name!r}: {location}/{CONFIG_FILE} is not UTF-8 ({error})") from None
        raw = read_model_config(text, f"{location}/{CONFIG_FILE}")
        dim, alpha, _variant = read_lora_config(raw, name)
        facts = nemo_model_facts(raw)
        num_layers, heads = raw.get("num_layers"), raw.get("num_attention_heads")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            _refuse(name, "num_layers", num_layers, "it must be a positive integer")
        _check_base(raw, facts, config, name)
        shards = read_shards(archive, name)
        tp_size = 1 + max(tp for tp, _ in shards)
        for field, found in (("tensor_model_parallel_size", tp_size),
                             ("pipeline_model_parallel_size", 1 + max(pp for _, pp in shards))):
            if raw.get(field, 1) != found:
                _refuse(name, field, raw.get(field), f"but the weights are split in {found}; the adapter is incomplete")
        state = merge_shards(shards, num_layers, facts.gated_mlp, name)
        tensors = {key: _read(lazy, key, name) for key, lazy in state.items()}
    finally:
        archive.close()
    pairs: dict[tuple[int, str, str | None], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        pairs.setdefault((int(match.group(1)), match.group(3), match.group(4)), {})[match.group(5)] = tensor
    scale = alpha / dim
    gated = any(layer.endswith(".gate_proj") for layer in shapes) if shapes else facts.gated_mlp
    if gated != facts.gated_mlp:
        _refuse(name, "activation", raw.get("activation"), "the adapter was trained on a model with"
                f"{'out' if gated else ''} a gated MLP, unlike this one")
    weights: dict[str, LoRAWeights] = {}
    halves: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(layer: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        if layer in weights:
            raise NemoliteError(f"LoRA adapter {name!r}: two adapters of {location} adapt {layer}")
        weights[layer] = LoRAWeights(lora_a, lora_b)

    for (layer, adapter, part), pair in pairs.items():
        where = f"decoder.layers.{layer}.{adapter}" + (f".{part}_adapter" if part else "")
        if set(pair) != {"in", "out"}:
            raise NemoliteError(f"LoRA adapter {name!r}: {where} has linear_{''.join(pair)} but not both "
                                "linear_in and linear_out")
        lora_a, lora_b = pair["in"], pair["out"] * scale
        if lora_a.shape[0] != dim or lora_b.shape[1] != dim:
            raise NemoliteError(f"LoRA adapter {name!r}: {where} has linear_in {list(lora_a.shape)} and linear_out "
                                f"{list(pair['out'].shape)}, but adapter_dim is {dim}")
        prefix = f"model.layers.{layer}."
        if adapter == "lora_kqv_adapter":
            q, k, v = _split_qkv(lora_b, heads, facts.num_query_groups, facts.head_dim, where, name)
            for proj, b in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                add(f"{prefix}self_attn.{proj}", lora_a, b)  # A is shared: one input, one low-rank projection
        elif adapter == "lora_unfused_kqv_adapter":
            add(f"{prefix}self_attn.{part}_proj", lora_a, lora_b)
        elif adapter == "lora_dense_attention_adapter":
            add(f"{prefix}self_attn.o_proj", lora_a, lora_b)
        elif adapter == "lora_4htoh_adapter":
            add(f"{prefix}mlp.down_proj", lora_a, lora_b)
        elif adapter == "lora_unfused_hto4h_adapter":
            if gated:
                add(f"{prefix}mlp.{part}_proj", lora_a, lora_b)
            else:
                halves.setdefault(f"{prefix}mlp.up_proj", {})[part] = (lora_a, lora_b)
        elif gated:
            if lora_b.shape[0] % 2:
                raise NemoliteError(f"LoRA adapter {name!r}: {where} has an odd number of rows for [gate; up]")
            gate, up = lora_b.chunk(2, dim=0)
            add(f"{prefix}mlp.gate_proj", lora_a, gate)
            add(f"{prefix}mlp.up_proj", lora_a, up)
        else:  # squared-ReLU: every row of linear_fc1 is up_proj's
            add(f"{prefix}mlp.up_proj", lora_a, lora_b)
    for layer, parts in halves.items():
        if set(parts) != {"gate", "up"}:
            raise NemoliteError(f"LoRA adapter {name!r}: {layer} has the canonical {''.join(parts)}_adapter alone")
        add(layer, *_stack_halves(parts["gate"], parts["up"], tp_size))
    return LoRAAdapter(name, weights, str(location))


def _stack_halves(gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor], tp_size: int):
    """The canonical gate and up adapters of an ungated fc1 as one LoRA of twice the rank. Each tensor-parallel
    rank adds [gate_r(x); up_r(x)] to its own rows of fc1, so B is block-diagonal within each rank's rows:
    A = [A_gate; A_up], B rows of rank r = [[B_gate_r, 0], [0, B_up_r]]."""
    lora_a = torch.cat([gate[0], up[0]], dim=0)
    rows = []
    for gate_b, up_b in zip(gate[1].chunk(tp_size, dim=0), up[1].chunk(tp_size, dim=0)):
        rows.append(torch.cat([gate_b, torch.zeros(gate_b.shape[0], up_b.shape[1])], dim=1))
        rows.append(torch.cat([torch.zeros(up_b.shape[0], gate_b.shape[1]), up_b], dim=1))
    return lora_a, torch.cat(rows, dim=0)


def _check_base(raw: dict, facts, config, name: str) -> None:
    """The adapter's base model (its model_config.yaml) against the served model, field by field."""
    if config is None:
        return
    kv_heads = config.layers[0].num_kv_heads if config.layers else None
    pairs = {"num_layers": (raw.get("num_layers"), config.num_layers),
             "hidden_size": (raw.get("hidden_size"), config.hidden_size),
             "num_attention_heads": (raw.get("num_attention_heads"), config.num_attention_heads),
             "kv_channels": (facts.head_dim, config.head_dim),
             "num_query_groups": (facts.num_query_groups, kv_heads)}
    for field, (adapter_value, model_value) in pairs.items():
        if adapter_value != model_value:
            _refuse(name, field, adapter_value, f"the served model has {model_value}; the adapter was trained "
                    "for another model")
