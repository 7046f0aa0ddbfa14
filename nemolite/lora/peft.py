"""Hugging Face PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

The rules are PEFT's own (peft/tuners/lora/layer.py, tuners_utils.check_target_module_exists,
utils/other.get_pattern_key): a layer's rank and alpha come from the first ``rank_pattern`` /
``alpha_pattern`` key matching the end of its name, else ``r`` / ``lora_alpha``; the scale is alpha / r, or
alpha / sqrt(r) with ``use_rslora``. Weights are stored as
``base_model.model.<layer name>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].
Configurations this runtime cannot serve exactly are refused by field, never approximated.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from nemolite.errors import NemoliteError
from nemolite.lora.adapter import LoRAAdapter, LoRAWeights

CONFIG = "adapter_config.json"
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def is_peft_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def _refuse(name: str, field: str, value, why: str) -> None:
    raise NemoliteError(f"LoRA adapter {name!r}: {field}={value!r} is not supported ({why})")


def read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise NemoliteError(f"LoRA adapter {name!r}: cannot read {path / CONFIG} ({error})") from None
    if not isinstance(config, dict):
        raise NemoliteError(f"LoRA adapter {name!r}: {path / CONFIG} is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        _refuse(name, "peft_type", peft_type, "only LoRA adapters are served")
    if config.get("use_dora"):
        _refuse(name, "use_dora", True, "DoRA rescales each weight column by its norm; merge it into the base model")
    if config.get("modules_to_save"):
        _refuse(name, "modules_to_save", config["modules_to_save"],
                "the adapter replaces whole layers; merge it into the base model")
    if config.get("bias", "none") != "none":
        _refuse(name, "bias", config["bias"], "the adapter trains biases of the base model; merge it")
    if config.get("lora_bias"):
        _refuse(name, "lora_bias", True, "B with a bias; merge the adapter into the base model")
    if config.get("fan_in_fan_out"):
        _refuse(name, "fan_in_fan_out", True, "for Conv1D layers (GPT-2), which Nemotron and Llama do not have")
    for field in ("r", "lora_alpha"):
        value = config.get(field, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise NemoliteError(f"LoRA adapter {name!r}: {field} must be a positive number, got {value!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in patterns.items()):
            raise NemoliteError(f"LoRA adapter {name!r}: {field} must map layer names to positive numbers")
    return config


def _pattern_key(patterns: dict, layer: str) -> str | None:
    for key in patterns:  # PEFT's get_pattern_key: the first key matching the end of the name
        try:
            if re.match(rf"(.*\.)?({key})$", layer):
                return key
        except re.error as error:
            raise NemoliteError(f"LoRA pattern {key!r} is not a valid regular expression ({error})") from None
    return None


def _target_matches(target: str | list, layer: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, layer) is not None
    return any(layer == t or layer.endswith("." + t) for t in target)


def check_targets(config: dict, name: str, layers: list[str]) -> None:
    """Every ``target_modules`` entry must match a layer of this model: one that matches none would leave
    the adapter silently partial (PEFT itself only raises when none of them match)."""
    targets = config.get("target_modules")
    if targets is None:
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise NemoliteError(f"LoRA adapter {name!r}: target_modules {targets!r} is not a valid "
                                f"regular expression ({error})") from None
        if not any(_target_matches(targets, layer) for layer in layers):
            raise NemoliteError(f"LoRA adapter {name!r}: target_modules {targets!r} matches no layer of this model")
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise NemoliteError(f"LoRA adapter {name!r}: target_modules must be a list of names or a regex")
    known = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    for target in targets:
        if not any(_target_matches([target], layer) for layer in layers):
            raise NemoliteError(f"LoRA adapter {name!r} targets {target!r}, which this model does not have "
                                f"(it has {', '.join(known)}); it was trained for another architecture")


def _check_size(name: str, declared: int, max_bytes: int | None) -> None:
    if max_bytes is not None and declared > max_bytes:
        raise NemoliteError(f"LoRA adapter {name!r} declares {declared / 1e6:.1f} MB of tensors; an adapter of this "
                            f"model within --max-lora-rank holds at most {max_bytes / 1e6:.1f} MB (nothing was read)")


def read_tensors(path: Path, name: str, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors (preferred) or a torch.save file read without running code;
    refused before anything is allocated when the file declares more than ``max_bytes``."""
    safetensors_file, bin_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if safetensors_file.is_file():
        from nemolite.checkpoint.hf import read_into, read_safetensors_header

        entries = read_safetensors_header(safetensors_file)
        _check_size(name, sum(entry.num_bytes for entry in entries.values()), max_bytes)
        tensors = {}
        with open(safetensors_file, "rb") as handle:
            for key, entry in entries.items():
                tensors[key] = torch.empty(entry.shape, dtype=entry.dtype)
                read_into(entry, tensors[key], handle)
        return tensors
    if bin_file.is_file():
        from nemolite.checkpoint.torch_zip import FileWindow, LazyTensor, read_torch_checkpoint

        state = read_torch_checkpoint(FileWindow(bin_file))
        lazy = {key: value for key, value in state.items() if isinstance(value, LazyTensor)}
        _check_size(name, sum(t.storage_numel * torch.empty((), dtype=t.dtype).element_size() for t in lazy.values()),
                    max_bytes)
        return {key: value.read() for key, value in lazy.items()}
    raise NemoliteError(f"LoRA adapter {name!r}: {path} has no adapter_model.safetensors or adapter_model.bin")


def read_peft_adapter(path: Path, name: str, layers: list[str], max_bytes: int | None = None) -> LoRAAdapter:
    """A PEFT directory as a LoRAAdapter for a model whose adaptable layers are ``layers``."""
    config = read_config(path, name)
    check_targets(config, name, layers)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path, name, max_bytes).items():
        match = _KEY.match(key)
        if match is None:
            raise NemoliteError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A or B weight of a linear "
                                "layer (embedding adapters and trained modules are not served)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    weights = {}
    for layer, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise NemoliteError(f"LoRA adapter {name!r}: {layer} has lora_{''.join(pair)} but not both A and B")
        key = _pattern_key(rank_pattern, layer)
        layer_rank = rank_pattern[key] if key is not None else rank
        key = _pattern_key(alpha_pattern, layer)
        layer_alpha = alpha_pattern[key] if key is not None else alpha
        lora_a, lora_b = pair["A"].float(), pair["B"].float()
        if lora_a.dim() != 2 or lora_a.shape[0] != layer_rank:
            raise NemoliteError(f"LoRA adapter {name!r}: {layer}.lora_A is {list(lora_a.shape)} but its rank is "
                                f"{layer_rank} by adapter_config.json")
        scale = layer_alpha / math.sqrt(layer_rank) if config.get("use_rslora") else layer_alpha / layer_rank
        weights[layer] = LoRAWeights(lora_a, lora_b * scale)
    return LoRAAdapter(name, weights, str(path))


def write_peft_adapter(path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float,
                       base_model: str = "", rank_pattern: dict | None = None,
                       alpha_pattern: dict | None = None) -> Path:
    """A PEFT LoRA directory: ``weights`` maps layer names to (A [r, in], B [out, r]) as PEFT stores them
    (unscaled: PEFT applies alpha / r itself); layers of rank ``rank`` but where ``rank_pattern`` says."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in weights})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": rank_pattern or {},
              "alpha_pattern": alpha_pattern or {}, "base_model_name_or_path": base_model, "inference_mode": True}
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, (lora_a, lora_b) in weights.items():  # copies: a NeMo kqv adapter's q, k and v share one A
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path
