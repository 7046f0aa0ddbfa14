"""Finding and loading checkpoints, whatever their format."""

from __future__ import annotations

from pathlib import Path

import torch

from nemolite.errors import NemoliteError


def resolve_model_path(model: str | Path | None) -> Path:
    """A local checkpoint directory; None means the bundled demo model."""
    if model is None:
        from nemolite.demo import DEMO_MODEL_PATH

        return DEMO_MODEL_PATH
    path = Path(model).expanduser()
    if not path.exists():
        raise NemoliteError(f"model {str(model)!r} is not a local path; nemolite loads checkpoints from disk "
                            "(download them first, e.g. with `huggingface-cli download`)")
    if not path.is_dir() and path.suffix not in (".nemo", ".gguf"):
        raise NemoliteError(f"model {str(model)!r} is a file; pass the checkpoint directory holding config.json "
                            "(or a .nemo or .gguf file)")
    return path


def load_checkpoint(path: Path, dtype: str | torch.dtype = "auto", device: torch.device | None = None,
                    tokenizer: str | Path | None = None, parallel=None, quantization=None):
    """(CausalLM, Tokenizer) from an HF directory, a NeMo checkpoint (.nemo file, dir with model_config.yaml)
    or a GGUF file (or a directory holding one; nemolite.checkpoint.gguf);
    with ``parallel`` (a ParallelState) the model is this rank's shard; with ``quantization`` (a
    nemolite.quant.QuantSpec) its linear layers are quantized (layers a loader already quantized stay)."""
    from nemolite.checkpoint.gguf import gguf_file, load_gguf
    from nemolite.checkpoint.hf import load_hf_model
    from nemolite.checkpoint.nemo import is_nemo_checkpoint, load_nemo_model
    from nemolite.tokenizer import Tokenizer

    device = device if device is not None else default_device()
    gguf = gguf_file(path)
    if gguf is not None:
        return load_gguf(gguf, dtype, device, tokenizer, parallel, quantization)
    if is_nemo_checkpoint(path):
        loaded = load_nemo_model(path, dtype=dtype, device=device, tokenizer=tokenizer, parallel=parallel)
        if loaded.tokenizer is None:
            raise NemoliteError(f"NeMo checkpoint {path} names no SentencePiece tokenizer; pass tokenizer=DIR")
        return _quantized(loaded.model, quantization), loaded.tokenizer
    model = load_hf_model(path, dtype=dtype, device=device, parallel=parallel, quantization=quantization)
    config = model.config
    return model, Tokenizer.from_pretrained(tokenizer or path, model_type=config.model_type,
                                            bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids)


def _quantized(model, quantization):
    if quantization is None:
        return model
    from nemolite.quant import quantize_model

    return quantize_model(model, quantization)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config(model: str | Path):
    """The ModelConfig of an HF directory, a NeMo checkpoint or a GGUF file, reading no weights."""
    from nemolite.checkpoint.gguf import GGUFCheckpoint, config_from_gguf, gguf_file
    from nemolite.checkpoint.nemo import NemoCheckpoint, is_nemo_checkpoint
    from nemolite.config import load_config

    path = resolve_model_path(model)
    if gguf_file(path) is not None:
        return config_from_gguf(GGUFCheckpoint(gguf_file(path)))
    if is_nemo_checkpoint(path):
        with NemoCheckpoint(path) as checkpoint:
            return checkpoint.config
    return load_config(path)
