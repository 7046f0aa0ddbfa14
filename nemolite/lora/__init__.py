"""LoRA adapters: formats read into one internal form, and the slots the engine serves them from."""

from nemolite.lora.adapter import LoRAAdapter, LoRAWeights
from nemolite.lora.request import LoRARequest

__all__ = ["LoRAAdapter", "LoRAWeights", "LoRARequest"]
