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
    if not path.is_dir():
        raise NemoliteError(f"model {str(model)!r} is a file; pass the checkpoint directory holding config.json")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
