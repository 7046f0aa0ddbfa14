"""Megatron-core distributed checkpoints, read with torch alone, one tensor at a time.

A NeMo 1 ``model_weights/`` or NeMo 2 ``weights/`` directory holds ``metadata.json``
(``{"sharded_backend": "torch_dist" | "zarr", ...}``), ``common.pt`` (non-sharded state, not weights,
never read here) and the tensors in one of two backends:

- ``torch_dist`` (``torch_dist.py``): PyTorch DCP, ``__<rank>_<n>.distcp`` data files and a pickled
  ``.metadata`` index, unpickled into inert records from an allow-list, never arbitrary globals.
- ``zarr`` (``zarr_array.py``): one zarr v2 array directory per key (``.zarray`` + chunk files
  ``0.0.0`` ...), parsed by hand: Megatron writes bf16 arrays with the dtype string ``"bfloat16"``,
  which zarr cannot parse.

Arrays hold the global (TP-merged) tensor. Homogeneous layers are stacked, so a key like
``model.decoder.layers.self_attention.linear_qkv.weight`` has shape ``[num_layers, ...]``;
``read_slice(key, i)`` reads layer ``i`` only: the chunks (zarr) or DCP shards that overlap it.
Megatron saves one chunk/shard per (layer, TP rank), so that is exactly layer ``i``'s bytes; a
checkpoint stored as one chunk for all layers is read whole and sliced (DCP loads a shard whole).

Peak extra memory of a read is the result plus one stored chunk/shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemolite.errors import NemoliteError

__all__ = ["DistCheckpointReader", "open_dist_checkpoint", "is_dist_checkpoint"]

BACKENDS = ("torch_dist", "zarr")


def is_dist_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a distributed-checkpoint weights directory (holds metadata.json)."""
    return (Path(directory) / "metadata.json").is_file()


def open_dist_checkpoint(directory: str | Path) -> DistCheckpointReader:
    """A reader for a ``model_weights/``/``weights/`` directory, or a checkpoint directory holding one."""
    directory = Path(directory)
    if not is_dist_checkpoint(directory):
        for sub in ("model_weights", "weights"):
            if is_dist_checkpoint(directory / sub):
                directory = directory / sub
                break
        else:
            raise NemoliteError(f"{directory} is not a distributed checkpoint: it has no metadata.json "
                                "(expected a NeMo model_weights/ or weights/ directory)")
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
        backend = metadata["sharded_backend"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise NemoliteError(f"{directory / 'metadata.json'} is unreadable or lacks 'sharded_backend': "
                            f"{error}") from error
    if backend == "torch_dist":
        from nemolite.checkpoint.torch_dist import TorchDistReader

        return TorchDistReader(directory)
    if backend == "zarr":
        from nemolite.checkpoint.zarr_array import ZarrReader

        return ZarrReader(directory)
    raise NemoliteError(f"{directory}: unsupported sharded_backend {backend!r}; nemolite reads "
                        f"{' and '.join(BACKENDS)}")


class DistCheckpointReader:
    """Keys, shapes and dtypes of the stored tensors; reads one tensor (or one leading-dim slice) at a time.

    Non-tensor entries (``_extra_state`` objects, BytesIO) are not listed.
    """

    backend: str

    def __init__(self, directory: Path):
        self.directory = directory
        self._shapes: dict[str, torch.Size] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def keys(self) -> list[str]:
        return sorted(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> torch.Size:
        return self._shapes[self._check(key)]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[self._check(key)]

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor."""
        shape = self.shape(key)
        if not shape:
            return self._read_rows(key, 0, 1).reshape(())
        return self._read_rows(key, 0, shape[0])

    def read_slice(self, key: str, index: int) -> torch.Tensor:
        """``read(key)[index]`` (e.g. layer ``index`` of a stacked tensor), reading only what covers it."""
        shape = self.shape(key)
        if not shape:
            raise NemoliteError(f"{key} is a scalar; it has no leading dimension to slice")
        if not -shape[0] <= index < shape[0]:
            raise NemoliteError(f"index {index} is out of range for {key} with leading dimension {shape[0]}")
        index %= shape[0]
        return self._read_rows(key, index, index + 1)[0]

    def _check(self, key: str) -> str:
        if key not in self._shapes:
            raise NemoliteError(f"{self.directory}: no tensor {key!r} in this checkpoint")
        return key

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the leading dimension (a 0-d tensor is one row)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, {len(self)} tensors)"
