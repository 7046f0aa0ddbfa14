"""Adapters out of nemolite: NeMo LoRA -> Hugging Face PEFT (so vLLM and NIM load what NeMo trained), and
an adapter merged into its base model's weights (``W + B A``, the scale applied: NeMo's merge script drops
alpha / adapter_dim).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

from nemolite.errors import NemoliteError
from nemolite.lora.adapter import LoRAAdapter


def is_nemo_lora(path: str | Path) -> bool:
    """A NeMo checkpoint whose model_config.yaml has a LoRA ``peft`` section (an adapter, not a model)."""
    from nemolite.checkpoint.nemo import is_nemo_checkpoint
    from nemolite.checkpoint.nemo_archive import NemoArchive
    from nemolite.checkpoint.nemo_config import read_model_config

    path = Path(path).expanduser()
    if not is_nemo_checkpoint(path):
        return False
    archive = NemoArchive(path)
    try:
        if not archive.exists("model_config.yaml"):
            return False
        raw = read_model_config(archive.read_bytes("model_config.yaml").decode("utf-8", "replace"), path)
    finally:
        archive.close()
    peft = raw.get("peft")
    return isinstance(peft, dict) and peft.get("peft_scheme") not in (None, "none")


def write_peft(adapter: LoRAAdapter, destination: str | Path, base_model: str = "", overwrite: bool = False) -> Path:
    """``adapter`` as a PEFT directory. B holds the scale already, so ``lora_alpha`` equals each layer's rank
    (alpha / r = 1); layers of another rank than the most common one go into rank_pattern / alpha_pattern."""
    from nemolite.lora.peft import write_peft_adapter

    destination = Path(destination).expanduser()
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise NemoliteError(f"{destination} exists and is not empty; pass --overwrite or choose another path")
    ranks = {name: w.rank for name, w in adapter.weights.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in sorted(ranks.items()) if r != rank}
    weights = {name: (w.lora_a.float(), w.lora_b.float()) for name, w in adapter.weights.items()}
    partial = destination.with_name(destination.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    write_peft_adapter(partial, weights, rank, rank, base_model, rank_pattern=pattern, alpha_pattern=pattern)
    if destination.exists():
        shutil.rmtree(destination)
    partial.rename(destination)
    return destination


def merged_tensors(tensors, adapter: LoRAAdapter):
    """``(name, tensor)`` pairs with each adapted weight replaced by ``W + B A`` (computed in fp32, stored in
    the weight's dtype); every layer of the adapter must be met."""
    pending = dict(adapter.weights)
    for name, tensor in tensors:
        w = pending.pop(name.removesuffix(".weight"), None) if name.endswith(".weight") else None
        if w is not None:
            tensor = (tensor.float() + w.lora_b.float() @ w.lora_a.float()).to(tensor.dtype)
        yield name, tensor
    if pending:
        raise NemoliteError(f"the base model has no weight for {sorted(pending)[:4]} of the adapter")
