"""NeMo 2 PEFT (LoRA) checkpoints: what ``llm.finetune(..., peft=llm.peft.LoRA(...))`` saves (NeMo 2.x).

Checked against NeMo 2.4.1's code (nemo/lightning/pytorch/callbacks/peft.py WrappedAdapterIO, io/pl.py
MegatronCheckpointIO, collections/llm/peft/lora.py, canonical_lora.py, utils.py ParallelLinearAdapter) and what it
writes (tests/lora/nemo2_lora_writer.py). A checkpoint directory holds:

- ``weights/``: a megatron-core torch_dist checkpoint of the adapter tensors alone (``.adapter.`` keys), read with
  nemolite's own reader. Layers are stacked: ``module.decoder.layers.self_attention.linear_qkv.adapter.
  linear_in.weight`` is [num_layers, r, in], global (tensor-parallel parts already merged, pipeline stages at
  their global layer). ``weights/adapter_metadata.json`` holds only ``model_ckpt_path`` (the base model).
- ``context/io.json``: fiddle's JSON of the TrainerContext; ``model.config`` is the base GPTConfig and
  ``model.model_transform`` the LoRA, with only the arguments given explicitly (the rest are the dataclass
  defaults, repeated in DEFAULTS). ``context/model.yaml`` is the same, written only where NeMo-Run is installed.

Arithmetic (ParallelLinearAdapter.forward): ``linear_out(linear_in(x)) * alpha / dim``, added to the target's
output; the scale is not in the weights, so it goes into B here. linear_qkv's rows are Megatron's (per query
group: its query heads, key head, value head, kv_channels rows each); linear_fc1's are [gate; up] when gated.
CanonicalLoRA keeps one adapter per part: ``linear_qkv.adapter.adapter_{q,k,v}``, ``linear_fc1.adapter.adapter_
{gate,up}``. DoRA, other PEFT methods, MoE expert adapters and unstacked layouts are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nemolite.checkpoint.dist_checkpoint import is_dist_checkpoint, open_dist_checkpoint
from nemolite.errors import NemoliteError
from nemolite.lora.adapter import LoRAAdapter, LoRAWeights
from nemolite.lora.nemo import _split_qkv

CONTEXT, WEIGHTS, METADATA = "context/io.json", "weights", "adapter_metadata.json"
# model_transform classes read, and the defaults of the fields io.json leaves out (NeMo 2.4.1's dataclasses)
LORA_CLASSES = {"nemo.collections.llm.peft.lora.LoRA": "lora",
                "nemo.collections.llm.peft.canonical_lora.CanonicalLoRA": "canonical"}
DEFAULTS = {"dim": 32, "alpha": 32}
_KEY = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+\.)?(self_attention|mlp)\.(linear_qkv|linear_proj|linear_fc1|"
                  r"linear_fc2)\.adapter\.(?:adapter_(q|k|v|gate|up)\.)?linear_(in|out)\.weight$")
_TARGET = {"linear_proj": "self_attn.o_proj", "linear_fc2": "mlp.down_proj", "q": "self_attn.q_proj",
           "k": "self_attn.k_proj", "v": "self_attn.v_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj"}


def is_nemo2_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a NeMo 2 PEFT checkpoint directory (weights/ + adapter_metadata.json or context)."""
    path = Path(path).expanduser()
    return path.is_dir() and is_dist_checkpoint(path / WEIGHTS) and (
        (path / WEIGHTS / METADATA).is_file() or (path / CONTEXT).is_file())


def _refuse(name: str, field: str, value, why: str):
    raise NemoliteError(f"LoRA adapter {name!r}: context/io.json field '{field}' is {value!r}; {why}")


def read_context(path: Path, name: str) -> dict:
    """io.json as plain data: each fiddle Config a dict of its given arguments plus ``__target__`` (module.name)."""
    try:
        document = json.loads((path / CONTEXT).read_text())
        objects, root = document["objects"], document["root"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise NemoliteError(f"LoRA adapter {name!r}: {path / CONTEXT} is not NeMo's context ({error}); without it "
                            "the LoRA's dim and alpha are unknown") from None
    seen: dict[str, object] = {}

    def value(node, depth=0):
        if depth > 64:
            raise NemoliteError(f"LoRA adapter {name!r}: {path / CONTEXT} nests deeper than NeMo writes")
        if not isinstance(node, dict):
            return node if isinstance(node, (str, int, float, bool, type(None))) else None
        kind = node.get("type")
        if kind == "leaf":
            return node.get("value")
        if kind == "pyref":
            return f"{node.get('module')}.{node.get('name')}"
        if kind == "ref":
            key = node.get("key")
            if key not in seen:
                seen[key] = None  # a cycle reads as None
                seen[key] = build(objects.get(key), depth + 1)
            return seen[key]
        return None  # other node kinds (enum values...) are not needed here

    def build(obj, depth):
        if not isinstance(obj, dict):
            return None
        items = [(str(label), value(node, depth)) for label, node in obj.get("items", [])]
        kind = value(obj.get("type", {}), depth)
        if kind in ("builtins.list", "builtins.tuple"):
            return [item for _, item in items]
        fields = {}
        for label, item in items:
            match = re.match(r"^(?:Attr\(name|Key\(key)='(.*)'\)$", label)
            if match:
                fields[match.group(1)] = item
        metadata = value(obj["metadata"], depth) if isinstance(obj.get("metadata"), dict) else None
        if isinstance(metadata, dict) and "fn_or_cls" in metadata:
            fields["__target__"] = metadata["fn_or_cls"]
        return fields

    context = value(root)
    return context if isinstance(context, dict) else {}


def _field(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def read_nemo2_adapter(path: str | Path, name: str, shapes: dict[str, tuple[int, int]]) -> LoRAAdapter:
    """A NeMo 2 LoRA checkpoint directory as a LoRAAdapter for a model whose adaptable layers have ``shapes``."""
    path = Path(path).expanduser()
    if not (path / CONTEXT).is_file():
        raise NemoliteError(f"LoRA adapter {name!r}: {path} has no {CONTEXT}; NeMo 2 keeps the LoRA's dim and alpha "
                            "there, so the adapter cannot be scaled")
    context = read_context(path, name)
    model = context.get("model") if isinstance(context.get("model"), dict) else {}
    transform, config = model.get("model_transform"), model.get("config")
    if not isinstance(transform, dict):
        _refuse(name, "model.model_transform", transform, "a PEFT checkpoint records its LoRA there")
    variant = LORA_CLASSES.get(transform.get("__target__"))
    if variant is None:
        _refuse(name, "model.model_transform", transform.get("__target__"), "only llm.peft.LoRA and CanonicalLoRA "
                "adapters are served (DoRA and other PEFT methods are not)")
    dim, alpha = (_field(transform, key, DEFAULTS[key]) for key in ("dim", "alpha"))
    for key, value in (("dim", dim), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            _refuse(name, f"model.model_transform.{key}", value, "it must be a positive number")
    config = config if isinstance(config, dict) else {}
    if _field(config, "num_moe_experts"):
        _refuse(name, "model.config.num_moe_experts", config["num_moe_experts"], "MoE models are not served")
    reader = open_dist_checkpoint(path / WEIGHTS)
    gated = any(layer.endswith(".gate_proj") for layer in shapes) if shapes else \
        bool(_field(config, "gated_linear_unit", False))
    qkv = _attention(config, shapes, name)
    scale = alpha / dim
    pairs: dict[tuple[int, str, str | None], dict[str, torch.Tensor]] = {}
    for key in reader.keys():
        match = _KEY.match(key)
        if match is None:
            why = "MoE expert adapters are not served" if "experts" in key else \
                "it is not a LoRA weight of linear_qkv, linear_proj, linear_fc1 or linear_fc2"
            raise NemoliteError(f"LoRA adapter {name!r}: tensor {key!r} in {path / WEIGHTS}: {why}")
        layer, block, target, part, side = match.groups()
        split = variant == "canonical" and target in ("linear_qkv", "linear_fc1")  # CanonicalLoRA's per-part ones
        if (part is not None) != split or part in ("q", "k", "v") and target != "linear_qkv" or \
                part in ("gate", "up") and target != "linear_fc1":
            raise NemoliteError(f"LoRA adapter {name!r}: {key} is not where NeMo's {variant} LoRA puts its weights")
        shape = reader.shape(key)
        if layer is None:  # stacked: [num_layers, rows, cols]
            if len(shape) != 3:
                raise NemoliteError(f"LoRA adapter {name!r}: {key} has shape {list(shape)}, not [layers, rows, cols]")
            for index in range(shape[0]):
                pairs.setdefault((index, target, part), {})[side] = reader.read_slice(key, index).float()
        else:
            pairs.setdefault((int(layer[:-1]), target, part), {})[side] = reader.read(key).float()
    weights: dict[str, LoRAWeights] = {}
    tp_size = _tensor_parallel(context, name)
    canonical_qkv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, target, part), pair in sorted(pairs.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")):
        where = f"decoder.layers.{layer}.{target}" + (f".adapter_{part}" if part else "")
        if set(pair) != {"in", "out"}:
            raise NemoliteError(f"LoRA adapter {name!r}: {where} has linear_{''.join(pair)} but not both "
                                "linear_in and linear_out")
        lora_a, lora_b = pair["in"], pair["out"] * scale
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != dim or lora_b.shape[1] != dim:
            raise NemoliteError(f"LoRA adapter {name!r}: {where} has linear_in {list(lora_a.shape)} and linear_out "
                                f"{list(pair['out'].shape)}, but model.model_transform.dim is {dim}")
        prefix = f"model.layers.{layer}."
        if target == "linear_qkv" and part is None:
            for proj, b in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(lora_b, *qkv, where, name)):
                weights[f"{prefix}self_attn.{proj}"] = LoRAWeights(lora_a, b)  # one A: q, k, v share the input
        elif target == "linear_fc1" and part is None:
            if gated:
                gate, up = lora_b.chunk(2, dim=0)
                weights[f"{prefix}mlp.gate_proj"], weights[f"{prefix}mlp.up_proj"] = \
                    LoRAWeights(lora_a, gate), LoRAWeights(lora_a, up)
            else:
                weights[f"{prefix}mlp.up_proj"] = LoRAWeights(lora_a, _unswiglu(lora_b, tp_size))
        elif part in ("q", "k", "v"):
            canonical_qkv.setdefault(layer, {})[part] = (lora_a, lora_b)
        elif part in ("gate", "up") and not gated:
            raise NemoliteError(f"LoRA adapter {name!r}: {where} is a CanonicalLoRA gate/up adapter, but the model's "
                                "MLP is not gated (linear_fc1 has no gate half)")
        else:
            weights[prefix + _TARGET[part or target]] = LoRAWeights(lora_a, lora_b)
    for layer, parts in canonical_qkv.items():
        if set(parts) != {"q", "k", "v"}:  # LoRALinearSplitQKV calls all three: NeMo cannot run fewer
            raise NemoliteError(f"LoRA adapter {name!r}: decoder.layers.{layer}.linear_qkv has CanonicalLoRA adapters "
                                f"{sorted(parts)} only; NeMo's LoRALinearSplitQKV needs adapter_q, _k and _v")
        lora_a, lora_b = _canonical_qkv(parts)
        where = f"decoder.layers.{layer}.linear_qkv.adapter"
        for proj, b in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(lora_b, *qkv, where, name)):
            weights[f"model.layers.{layer}.self_attn.{proj}"] = LoRAWeights(lora_a, b)
    return LoRAAdapter(name, weights, str(path))


def _canonical_qkv(parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo 2.4.1's LoRALinearSplitQKV adds cat([q(x), k(x), v(x)]) (all query heads, then all keys, then all
    values) to linear_qkv's output as is, whose rows are grouped per query group; with more than one group the
    parts land on other heads' rows. To serve what was trained, the three are one fused LoRA of rank 3r (A
    stacked, B block-diagonal in that [q; k; v] order), split into q/k/v like linear_qkv's own rows."""
    lora_a = torch.cat([parts[p][0] for p in "qkv"], dim=0)
    lora_b = torch.block_diag(*(parts[p][1] for p in "qkv"))
    return lora_a, lora_b


def _attention(config: dict, shapes: dict[str, tuple[int, int]], name: str) -> tuple[int, int, int]:
    """(num_attention_heads, num_query_groups, kv_channels) for splitting linear_qkv's rows. Fields io.json left
    at their class default are taken from the served model's q_proj / k_proj rows."""
    heads = _field(config, "num_attention_heads")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        _refuse(name, "model.config.num_attention_heads", heads, "it must be a positive integer")
    q_rows = next((out for layer, (out, _) in shapes.items() if layer.endswith(".q_proj")), None)
    k_rows = next((out for layer, (out, _) in shapes.items() if layer.endswith(".k_proj")), None)
    hidden = _field(config, "hidden_size")
    head_dim = _field(config, "kv_channels") or (q_rows // heads if q_rows else None) or \
        (hidden // heads if isinstance(hidden, int) else None)
    groups = _field(config, "num_query_groups") or (k_rows // head_dim if k_rows and head_dim else heads)
    if not head_dim or heads % groups:
        _refuse(name, "model.config.kv_channels", config.get("kv_channels"), "the head size is not known")
    if q_rows and q_rows != heads * head_dim or k_rows and k_rows != groups * head_dim:
        _refuse(name, "model.config.num_attention_heads", heads, f"with {groups} query groups of kv_channels "
                f"{head_dim} it does not match the served model's q_proj/k_proj; the adapter is for another model")
    return heads, groups, head_dim


def _tensor_parallel(context: dict, name: str) -> int:
    trainer = context.get("trainer") if isinstance(context.get("trainer"), dict) else {}
    strategy = trainer.get("strategy") if isinstance(trainer.get("strategy"), dict) else {}
    size = _field(strategy, "tensor_model_parallel_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        _refuse(name, "trainer.strategy.tensor_model_parallel_size", size, "it must be a positive integer")
    return size


def _unswiglu(b: torch.Tensor, tp_size: int) -> torch.Tensor:
    """linear_fc1's adapter is saved with megatron's swiglu sharded factory even for an ungated MLP (utils.py
    keys it on the name): each rank's rows are halved and stored as [all ranks' first halves; all ranks' second
    halves]. With one rank that is the plain order; with more, each rank's rows are put back together."""
    if tp_size == 1:
        return b
    first, second = (half.chunk(tp_size, dim=0) for half in b.chunk(2, dim=0))
    return torch.cat([part for pair in zip(first, second) for part in pair], dim=0)
