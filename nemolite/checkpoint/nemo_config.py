"""NeMo ``model_config.yaml`` (MegatronGPTModel) → the equivalent Hugging Face ``config.json`` → ModelConfig.

squared-relu + LayerNorm1P maps to HF ``nemotron``; (fast-)swiglu + RMSNorm to HF ``llama``.
Anything else that changes the arithmetic raises a NemoliteError naming the YAML field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nemolite.config import ModelConfig, config_from_hf
from nemolite.errors import NemoliteError

ACTIVATIONS = {"squared-relu": "relu2", "swiglu": "swiglu", "fast-swiglu": "swiglu"}
NORMALIZATIONS = ("layernorm1p", "layernorm", "rmsnorm")
PRECISION_DTYPES = {"bf16": "bfloat16", "bf16-mixed": "bfloat16", "16": "float16", "16-mixed": "float16",
                    "fp16": "float16", "32": "float32", "fp32": "float32", "32-true": "float32"}
# MCore's llama3 RoPE scaling constants (``scale_positional_embedding: true``).
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
# Fields whose non-default values nemolite cannot run, with the value that is fine.
_UNSUPPORTED = {"num_moe_experts": (None, 0, 1), "qk_layernorm": (None, False), "rotary_interleaved": (None, False),
                "normalize_attention_scores": (None, True), "transformer_block_type": (None, "pre_ln"),
                "headscale": (None, False)}


@dataclasses.dataclass(frozen=True)
class NemoModelFacts:
    """What the weight mapping needs beyond the HF config."""

    gated_mlp: bool               # linear_fc1 holds cat(gate, up)
    zero_centred_norm: bool       # stored norm weights are w - 1 (layernorm1p); plain layernorm stores w
    has_norm_bias: bool
    num_query_groups: int
    head_dim: int
    tokenizer_library: str | None
    tokenizer_model: str | None   # artifact name inside the archive, "nemo:" stripped


def _field(raw: dict, name: str, kind: type | tuple, default: Any = ...) -> Any:
    value = raw.get(name)
    if value is None:
        if default is ...:
            raise NemoliteError(f"model_config.yaml field '{name}' is missing")
        return default
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise NemoliteError(f"model_config.yaml field '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def nemo_model_facts(raw: dict) -> NemoModelFacts:
    for name, fine in _UNSUPPORTED.items():
        if raw.get(name) not in fine:
            raise NemoliteError(f"model_config.yaml field '{name}' is {raw.get(name)!r}; nemolite does not support it")
    activation = raw.get("activation", "gelu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise NemoliteError(f"model_config.yaml field 'activation' is {activation!r}; nemolite runs "
                            f"{sorted(ACTIVATIONS)} (no GELU MLP in the Nemotron family)")
    normalization = raw.get("normalization", "layernorm")
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
        raise NemoliteError(f"model_config.yaml field 'normalization' is {normalization!r}; "
                            f"supported: {NORMALIZATIONS}")
    if normalization == "layernorm" and raw.get("layernorm_zero_centered_gamma"):
        normalization = "layernorm1p"
    gated = ACTIVATIONS[activation] == "swiglu"
    if gated != (normalization == "rmsnorm"):
        raise NemoliteError(
            f"model_config.yaml fields 'activation' ({activation!r}) and 'normalization' ({normalization!r}) "
            "do not form a supported model: squared-relu goes with layernorm1p/layernorm (Nemotron), "
            "swiglu with rmsnorm (Llama)")
    hidden = _field(raw, "hidden_size", int)
    heads = _field(raw, "num_attention_heads", int)
    head_dim = _field(raw, "kv_channels", int, None)
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise NemoliteError("model_config.yaml field 'kv_channels' is missing and hidden_size is not a "
                                "multiple of num_attention_heads")
        head_dim = hidden // heads
    groups = _field(raw, "num_query_groups", int, heads)
    if groups <= 0 or heads % groups:
        raise NemoliteError(f"model_config.yaml field 'num_query_groups' ({groups}) must divide "
                            f"num_attention_heads ({heads})")
    tokenizer = raw.get("tokenizer") or {}
    if not isinstance(tokenizer, dict):
        raise NemoliteError(f"model_config.yaml field 'tokenizer' must be a mapping, got {tokenizer!r}")
    model = tokenizer.get("model")
    if isinstance(model, str) and model.startswith("nemo:"):
        model = model[len("nemo:"):]
    return NemoModelFacts(gated, normalization == "layernorm1p", normalization != "rmsnorm", groups, head_dim,
                          tokenizer.get("library"), model if isinstance(model, str) else None)


def hf_config_from_nemo(raw: dict, vocab_size: int, tie_word_embeddings: bool | None = None,
                        bos_token_id: int | None = None, eos_token_id: int | None = None,
                        torch_dtype: str | None = None) -> dict[str, Any]:
    """The HF ``config.json`` of a NeMo model; ``vocab_size`` is the tokenizer's (unpadded) size."""
    facts = nemo_model_facts(raw)
    position = raw.get("position_embedding_type", "rope")
    if position != "rope":
        raise NemoliteError(f"model_config.yaml field 'position_embedding_type' is {position!r}; nemolite supports "
                            "only 'rope' (learned absolute position embeddings are not in the Nemotron family)")
    rotary = raw.get("rotary_percentage", raw.get("rotary_percent", 1.0))
    if not isinstance(rotary, (int, float)) or isinstance(rotary, bool) or not 0 < rotary <= 1:
        raise NemoliteError(f"model_config.yaml field 'rotary_percentage' must be in (0, 1], got {rotary!r}")
    tied = raw.get("share_embeddings_and_output_weights")
    tied = tie_word_embeddings if tied is None else tied
    if not isinstance(tied, bool):
        raise NemoliteError("model_config.yaml field 'share_embeddings_and_output_weights' must be true or false")
    bias = _field(raw, "bias", bool, True)
    hf: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": _field(raw, "hidden_size", int),
        "intermediate_size": _field(raw, "ffn_hidden_size", int),
        "num_hidden_layers": _field(raw, "num_layers", int),
        "num_attention_heads": _field(raw, "num_attention_heads", int),
        "num_key_value_heads": facts.num_query_groups,
        "head_dim": facts.head_dim,
        "max_position_embeddings": _field(raw, "max_position_embeddings", int, _field(raw, "seq_length", int, 4096)),
        "rope_theta": float(_field(raw, "rotary_base", (int, float), 10000.0)),
        "tie_word_embeddings": tied,
        "attention_bias": bias,
        "mlp_bias": bias,
        "initializer_range": float(_field(raw, "init_method_std", (int, float), 0.02)),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype or PRECISION_DTYPES.get(str(raw.get("precision")), "float32"),
        "transformers_version": "4.44.0",
    }
    epsilon = float(_field(raw, "layernorm_epsilon", (int, float), 1e-5))
    scaling = None
    if raw.get("scale_positional_embedding"):
        scaling = dict(LLAMA3_ROPE_SCALING)
    elif raw.get("seq_len_interpolation_factor") not in (None, 1, 1.0):
        scaling = {"rope_type": "linear", "factor": float(_field(raw, "seq_len_interpolation_factor", (int, float)))}
    if facts.gated_mlp:
        if rotary != 1:
            raise NemoliteError(f"model_config.yaml field 'rotary_percentage' is {rotary}; a swiglu (Llama) "
                                "model must rotate the whole head (1.0)")
        hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=epsilon)
        if scaling:
            hf["rope_scaling"] = scaling
    else:
        if scaling:
            raise NemoliteError("model_config.yaml fields 'scale_positional_embedding'/'seq_len_interpolation_factor' "
                                "are set; RoPE scaling is not supported for squared-relu (Nemotron) models")
        hf.update(architectures=["NemotronForCausalLM"], model_type="nemotron", hidden_act="relu2", norm_eps=epsilon,
                  partial_rotary_factor=float(rotary))
    return hf


def config_from_nemo(raw: dict, vocab_size: int, **hf_fields) -> ModelConfig:
    return config_from_hf(hf_config_from_nemo(raw, vocab_size, **hf_fields))


def read_model_config(text: str, where: str | Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise NemoliteError(f"{where} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise NemoliteError(f"{where} does not hold a model configuration mapping")
    return raw
