"""ModelConfig: one description of every supported decoder, one LayerSpec per layer.

Built from a Hugging Face ``config.json`` (model_type ``nemotron``, ``llama``,
``nemotron-nas``); NeMo's ``model_config.yaml`` maps onto the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from nemolite.errors import NemoliteError

ATTENTION_KINDS = ("attention", "linear", "no_op")
MLP_KINDS = ("relu2", "swiglu", "linear", "no_op")
NORM_KINDS = ("layernorm1p", "rmsnorm")
ROPE_TYPES = ("default", "linear", "llama3")

# Spellings of the rotary fraction found in the wild (HF, pre-release and third-party configs).
_ROTARY_FRACTION_KEYS = ("partial_rotary_factor", "rope_percent", "rope_pct", "rope_percentage")


@dataclasses.dataclass(frozen=True, slots=True)
class LayerSpec:
    """What one decoder layer holds.

    attention: "attention" (GQA with ``num_kv_heads``), "linear" (x + W·norm(x), no cache)
    or "no_op" (skipped, no norm). mlp: "relu2" / "swiglu" of width ``intermediate_size``,
    "linear" or "no_op".
    """

    attention: str = "attention"
    num_kv_heads: int = 0
    mlp: str = "relu2"
    intermediate_size: int = 0

    @property
    def has_kv_cache(self) -> bool:
        return self.attention == "attention"


@dataclasses.dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    head_dim: int
    layers: list[LayerSpec]
    norm: str = "layernorm1p"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    torch_dtype: str | None = None
    # A reward model's head outputs, in order (HF *ForSequenceClassification, NeMo rm_head); empty for an LM.
    reward_attributes: tuple[str, ...] = ()

    @property
    def is_reward_model(self) -> bool:
        return bool(self.reward_attributes)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> "ModelConfig":
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise NemoliteError(f"config field '{field}' {why}")

        for field in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        need(self.norm in NORM_KINDS, "norm", f"must be one of {NORM_KINDS}, got {self.norm!r}")
        need(len(self.layers) > 0, "num_hidden_layers", "must be at least 1")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor",
             f"must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "partial_rotary_factor",
             f"gives an odd or empty rotary dimension {self.rotary_dim} for head_dim {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            need(rope_type in ROPE_TYPES, "rope_scaling.rope_type",
                 f"{rope_type!r} is not supported; supported: {ROPE_TYPES}")
        for index, layer in enumerate(self.layers):
            where = f"layer {index}"
            need(layer.attention in ATTENTION_KINDS, "block_configs.attention", f"({where}) unknown kind {layer.attention!r}")
            need(layer.mlp in MLP_KINDS, "block_configs.ffn", f"({where}) unknown kind {layer.mlp!r}")
            if layer.attention == "attention":
                need(layer.num_kv_heads > 0 and self.num_attention_heads % layer.num_kv_heads == 0,
                     "num_key_value_heads",
                     f"({where}) {layer.num_kv_heads} must be positive and divide "
                     f"num_attention_heads={self.num_attention_heads}")
            if layer.mlp in ("relu2", "swiglu"):
                need(layer.intermediate_size > 0, "intermediate_size", f"({where}) must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's FFN width rule (same in the remote code, vLLM, TensorRT-LLM and llama.cpp)."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise NemoliteError(f"no config.json in {path}: is this a Hugging Face checkpoint directory?")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise NemoliteError(f"{file} is not valid JSON: {error}") from None
    generation = path / "generation_config.json" if path.is_dir() else file.with_name("generation_config.json")
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    return config_from_hf(raw)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in ("deci", "nemotron-nas") or "DeciLMForCausalLM" in architectures:
        model_type = "nemotron-nas"
    builders = {"nemotron": _nemotron_layers, "llama": _llama_layers, "nemotron-nas": _nas_layers}
    if model_type not in builders:
        raise NemoliteError(
            f"config field 'model_type' is {model_type!r}; nemolite supports 'nemotron' (Nemotron-3/4, Minitron), "
            "'llama' (Llama-3.1, Llama-3.1-Nemotron-70B) and 'nemotron-nas' (DeciLMForCausalLM)")
    hidden_size = _require(raw, "hidden_size")
    num_heads = _require(raw, "num_attention_heads")
    if not isinstance(hidden_size, int) or not isinstance(num_heads, int) or num_heads <= 0:
        raise NemoliteError("config fields 'hidden_size' and 'num_attention_heads' must be positive integers")
    head_dim = raw.get("head_dim") or hidden_size // num_heads
    is_nemotron = model_type == "nemotron"
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rotary_fraction = rope.get("partial_rotary_factor")
    for key in _ROTARY_FRACTION_KEYS:
        if rotary_fraction is None and raw.get(key) is not None:
            rotary_fraction = raw[key]
    if rotary_fraction is None:
        rotary_fraction = 0.5 if is_nemotron else 1.0
    rope_scaling = None
    if rope_type != "default":
        rope_scaling = {key: value for key, value in rope.items()
                        if key not in ("rope_theta", "partial_rotary_factor", "type")}
        rope_scaling["rope_type"] = rope_type
    eos = raw.get("eos_token_id")
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return ModelConfig(
        model_type=model_type,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        head_dim=head_dim,
        layers=builders[model_type](raw, hidden_size, num_heads),
        norm="layernorm1p" if is_nemotron else "rmsnorm",
        norm_eps=float(raw.get("norm_eps", 1e-5) if is_nemotron else raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        partial_rotary_factor=float(rotary_fraction),
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096 if is_nemotron else 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        reward_attributes=_reward_attributes(raw, architectures),
    ).validate()


def _reward_attributes(raw: dict[str, Any], architectures: list[str]) -> tuple[str, ...]:
    """A sequence-classification checkpoint is a reward model: one output per label, named by ``id2label``
    unless those are HF's placeholder ``LABEL_i`` names."""
    if not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return ()
    id2label = raw.get("id2label") or {}
    count = raw.get("num_labels") or len(id2label)
    if not isinstance(count, int) or count < 1:
        raise NemoliteError("a *ForSequenceClassification config needs 'num_labels' (or 'id2label') >= 1")
    names = [id2label.get(str(i), id2label.get(i)) for i in range(count)]
    if all(isinstance(name, str) for name in names) and names != [f"LABEL_{i}" for i in range(count)]:
        return tuple(names)
    from nemolite.reward import attribute_names

    return attribute_names(count)


def _require(raw: dict[str, Any], field: str) -> Any:
    if raw.get(field) is None:
        raise NemoliteError(f"config field '{field}' is missing")
    return raw[field]


def _num_kv_heads(raw: dict[str, Any], num_heads: int) -> int:
    value = raw.get("num_key_value_heads")
    return num_heads if value is None else value


def _nemotron_layers(raw: dict[str, Any], hidden_size: int, num_heads: int) -> list[LayerSpec]:
    act = raw.get("hidden_act", "relu2")
    if act != "relu2":
        raise NemoliteError(f"config field 'hidden_act' is {act!r}; Nemotron models use 'relu2' (squared ReLU)")
    spec = LayerSpec("attention", _num_kv_heads(raw, num_heads), "relu2", _require(raw, "intermediate_size"))
    return [spec] * _require(raw, "num_hidden_layers")


def _llama_layers(raw: dict[str, Any], hidden_size: int, num_heads: int) -> list[LayerSpec]:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise NemoliteError(f"config field 'hidden_act' is {act!r}; Llama models use 'silu' (SwiGLU)")
    if raw.get("pretraining_tp", 1) != 1:
        raise NemoliteError("config field 'pretraining_tp' must be 1 (sliced-weight training layouts are not supported)")
    spec = LayerSpec("attention", _num_kv_heads(raw, num_heads), "swiglu", _require(raw, "intermediate_size"))
    return [spec] * _require(raw, "num_hidden_layers")


def _nas_layers(raw: dict[str, Any], hidden_size: int, num_heads: int) -> list[LayerSpec]:
    blocks = _require(raw, "block_configs")
    num_layers = raw.get("num_hidden_layers", len(blocks))
    if not isinstance(blocks, list) or len(blocks) != num_layers:
        raise NemoliteError(
            f"config field 'block_configs' must list one block per layer: {num_layers} layers, "
            f"{len(blocks) if isinstance(blocks, list) else 'no list of'} blocks")
    layers = []
    for index, block in enumerate(blocks):
        attention, ffn = block.get("attention", {}), block.get("ffn", {})
        where = f"block_configs[{index}]"
        for part, name in ((attention, "attention"), (ffn, "ffn")):
            if part.get("no_op") and part.get("replace_with_linear"):
                raise NemoliteError(f"config field '{where}.{name}' sets both no_op and replace_with_linear")
        for unsupported in ("sparsify", "window_length", "num_sink_tokens"):
            if attention.get(unsupported) or ffn.get(unsupported):
                raise NemoliteError(f"config field '{where}.{unsupported}' is set; nemolite does not support it")
        attention_kind, kv_heads = _replaced_kind(attention), 0
        if attention_kind is None:
            group = attention.get("n_heads_in_group")
            if not isinstance(group, int) or group <= 0 or num_heads % group:
                raise NemoliteError(f"config field '{where}.attention.n_heads_in_group' must be a positive "
                                    f"divisor of num_attention_heads={num_heads}, got {group!r}")
            attention_kind, kv_heads = "attention", num_heads // group
        mlp_kind, width = _replaced_kind(ffn), 0
        if mlp_kind is None:
            mult = ffn.get("ffn_mult")
            if not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise NemoliteError(f"config field '{where}.ffn.ffn_mult' must be a positive number, got {mult!r}")
            mlp_kind, width = "swiglu", ffn_mult_to_intermediate_size(round(mult, 6), hidden_size)
        layers.append(LayerSpec(attention_kind, kv_heads, mlp_kind, width))
    return layers


def _replaced_kind(part: dict[str, Any]) -> str | None:
    """"no_op" or "linear" for a NAS sublayer that was replaced; None for a real one."""
    return "no_op" if part.get("no_op") else "linear" if part.get("replace_with_linear") else None
