"""The one internal form of a LoRA adapter, whatever format it was read from (PEFT, NeMo).

An adapter is a low-rank update ``W' = W + B @ A`` of some of the decoder's linear layers, named as the
Hugging Face checkpoint names them before any fusion (``model.layers.3.self_attn.q_proj``). The scale
(``alpha / r``, ``alpha / sqrt(r)`` for rsLoRA, ``alpha / adapter_dim`` for NeMo) is folded into B, so a
reader's job ends once it has produced, per layer, A [r, in] and B [out, r].
"""

from __future__ import annotations

import dataclasses
import re

import torch

from nemolite.errors import NemoliteError

# The decoder's adaptable linear layers, by the last part of their name (Nemotron has no gate_proj).
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "linear_attn", "linear_mlp")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


@dataclasses.dataclass(slots=True)
class LoRAWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], scale folded in

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclasses.dataclass(slots=True)
class LoRAAdapter:
    name: str
    weights: dict[str, LoRAWeights]  # by the base model's layer name
    source: str = ""  # where it was read from, for messages

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.weights.values())

    @property
    def num_bytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for w in self.weights.values())

    def check(self, shapes: dict[str, tuple[int, int]], max_rank: int) -> None:
        """Refuse an adapter this model cannot run: a layer it does not have or of another shape, a rank
        above ``max_rank``, weights that are not finite. ``shapes``: (out, in) of each adaptable layer."""
        if not self.weights:
            raise NemoliteError(f"LoRA adapter {self.name!r} ({self.source}) adapts no layer")
        for name, w in self.weights.items():
            if name not in shapes:
                known = sorted({n.rsplit(".", 1)[-1] for n in shapes})
                raise NemoliteError(f"LoRA adapter {self.name!r} adapts {name}, which this model does not have "
                                    f"(its adaptable layers are {', '.join(known)} in model.layers.N)")
            out_features, in_features = shapes[name]
            if w.lora_a.dim() != 2 or w.lora_b.dim() != 2 or w.lora_a.shape[1] != in_features \
                    or w.lora_b.shape[0] != out_features or w.lora_b.shape[1] != w.rank:
                raise NemoliteError(
                    f"LoRA adapter {self.name!r}: {name} has A {tuple(w.lora_a.shape)} and B {tuple(w.lora_b.shape)}, "
                    f"but the layer maps {in_features} -> {out_features} features (A must be [r, {in_features}], "
                    f"B [{out_features}, r]); the adapter was trained for another model")
            if w.rank > max_rank:
                raise NemoliteError(f"LoRA adapter {self.name!r} has rank {w.rank} at {name}, above max_lora_rank "
                                    f"{max_rank}; start the engine with --max-lora-rank {w.rank} or more")
            if not (torch.isfinite(w.lora_a).all() and torch.isfinite(w.lora_b).all()):
                raise NemoliteError(f"LoRA adapter {self.name!r}: {name} holds non-finite weights")


def layer_index(name: str) -> int | None:
    """The decoder layer of an adaptable layer name, or None if the name is not one."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match and match.group(3) in TARGET_SUFFIXES else None


def adaptable_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable linear layer of the whole model ``config`` (a ModelConfig) describes, by HF
    name (no weights are made: the model is built on the meta device)."""
    from nemolite.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(config)
    return {name: (module.out_features, module.in_features) for name, module in model.named_modules()
            if layer_index(name) is not None}
