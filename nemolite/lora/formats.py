"""Which reader an adapter path needs."""

from __future__ import annotations

from pathlib import Path

from nemolite.errors import NemoliteError
from nemolite.lora.adapter import LoRAAdapter
from nemolite.lora.nemo import is_nemo_adapter, read_nemo_adapter
from nemolite.lora.nemo2 import is_nemo2_adapter, read_nemo2_adapter
from nemolite.lora.peft import is_peft_adapter, read_peft_adapter

FORMATS = ("a PEFT directory with adapter_config.json, or a NeMo LoRA .nemo file (or a directory with its "
           "model_config.yaml, or holding one .nemo), or a NeMo 2 PEFT checkpoint directory (weights/ and "
           "context/)")


def read_adapter(path: str, name: str, shapes: dict[str, tuple[int, int]], max_rank: int | None = None) -> LoRAAdapter:
    """The adapter at ``path`` for a model whose adaptable layers have ``shapes`` (name -> (out, in)). With
    ``max_rank``, a PEFT file declaring more bytes than such an adapter can hold (fp32) is refused unread."""
    location = Path(path).expanduser() if path else None
    if location is None or not location.exists():
        raise NemoliteError(f"LoRA adapter {name!r}: {path!r} does not exist; give {FORMATS}")
    if is_peft_adapter(location):
        bound = None if max_rank is None else 4 * max_rank * sum(out + inp for out, inp in shapes.values()) + 2**20
        return read_peft_adapter(location, name, list(shapes), bound)
    if is_nemo2_adapter(location):  # before NeMo 1: a NeMo 2 directory never holds model_config.yaml
        return read_nemo2_adapter(location, name, shapes)
    if is_nemo_adapter(location):
        return read_nemo_adapter(location, name, shapes)
    raise NemoliteError(f"LoRA adapter {name!r}: {path} is not an adapter nemolite reads ({FORMATS})")
